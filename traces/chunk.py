"""TraceChunk: a block of consecutive tokens, as plain NumPy arrays (the in-memory form of a trace)."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass, fields

import numpy as np


@dataclass
class TraceChunk:
    """Columns for T tokens; a field left as None was not requested or is not stored.

    seq_id, position, token_id, phase, step: [T]
    expert_ids, expert_weights: [T, L, K]; router_logits: [T, L, E]
    """

    seq_id: np.ndarray | None = None
    position: np.ndarray | None = None
    token_id: np.ndarray | None = None
    phase: np.ndarray | None = None
    step: np.ndarray | None = None
    expert_ids: np.ndarray | None = None
    expert_weights: np.ndarray | None = None
    router_logits: np.ndarray | None = None

    @property
    def num_tokens(self) -> int:
        for f in fields(self):
            value = getattr(self, f.name)
            if value is not None:
                return int(value.shape[0])
        return 0

    def present(self) -> dict[str, np.ndarray]:
        return {f.name: getattr(self, f.name) for f in fields(self) if getattr(self, f.name) is not None}

    def slice(self, start: int, stop: int) -> TraceChunk:
        return TraceChunk(**{name: value[start:stop] for name, value in self.present().items()})

    @staticmethod
    def concat(chunks: list[TraceChunk]) -> TraceChunk:
        if len(chunks) == 1:
            return chunks[0]
        names = chunks[0].present().keys()
        return TraceChunk(**{n: np.concatenate([getattr(c, n) for c in chunks]) for n in names})


def numbered(chunks: Iterable[TraceChunk], t0: int) -> Iterator[tuple[int, TraceChunk]]:
    """(global index of its first token, chunk) for consecutive chunks whose first token is t0."""
    for chunk in chunks:
        yield t0, chunk
        t0 += chunk.num_tokens
