"""TraceSink: where every importer puts its tokens. It checks them, buffers a chunk and streams it to a trace.

Shape legend: T tokens, L MoE layers, K top-k, E experts per layer.

The sink opens the writer at the first batch (so an importer can decide columns such as token ids from what
the source holds), writes `<output>.partial` and renames it only when the import finishes; any error removes
the partial file, so a failed import leaves nothing under the output name.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence
from pathlib import Path
from types import TracebackType

import numpy as np

from traces.chunk import TraceChunk
from traces.errors import InputError
from traces.importers.id_kernels import OUT_OF_RANGE, TWICE, first_bad_id
from traces.schema import PHASE_NAMES, TraceMetadata
from traces.writer import TraceWriter, open_writer, partial_path

DEFAULT_BUFFER_TOKENS = 1 << 16


def fingerprint(parts: Sequence[bytes | np.ndarray | int | str]) -> bytes:
    """A 16-byte digest of a sequence of arrays, integers and strings (to find ranks that recorded the same
    thing)."""
    h = hashlib.blake2b(digest_size=16)
    for part in parts:
        if isinstance(part, np.ndarray):
            h.update(f"{part.dtype.str}{part.shape}".encode())
            h.update(np.ascontiguousarray(part).reshape(-1).view(np.uint8).data)
        elif isinstance(part, int):
            h.update(part.to_bytes(8, "little", signed=True))
        else:
            h.update(part if isinstance(part, bytes) else part.encode())
        h.update(b"|")
    return h.digest()


class TraceSink:
    """Checks imported batches and writes them to `output` in chunks of about `buffer_tokens` tokens.

    >>> with TraceSink("trace.h5", meta) as sink:
    ...     sink.add(seq_id=..., position=..., phase=..., step=..., expert_ids=..., where="dump.pt record 3")
    """

    def __init__(self, output: str | Path, metadata: TraceMetadata, *, force: bool = False,
                 compression: str | None = None, buffer_tokens: int = DEFAULT_BUFFER_TOKENS,
                 on_tokens: Callable[[int], None] | None = None):
        self.output = Path(output)
        self.metadata = metadata
        self.force = force
        self.compression = compression
        self.buffer_tokens = buffer_tokens
        self.on_tokens = on_tokens  # progress callback: tokens added
        self.num_tokens = 0
        self._writer: TraceWriter | None = None
        self._pending: list[TraceChunk] = []
        self._pending_tokens = 0
        self._seen: set[bytes] = set()
        self._last_step = -1
        if self.output.exists() and not force:
            raise InputError(f"{self.output}: already exists (pass --force to overwrite)")

    def add(self, *, seq_id: np.ndarray, position: np.ndarray, phase: np.ndarray, step: np.ndarray,
            expert_ids: np.ndarray, where: str, token_id: np.ndarray | None = None,
            expert_weights: np.ndarray | None = None, router_logits: np.ndarray | None = None) -> None:
        """Add T tokens: per-token columns [T], expert_ids (logical ids) and expert_weights [T, L, K]. The
        sink may keep the arrays until it writes them: pass arrays the caller will not change."""
        meta = self.metadata
        n = int(expert_ids.shape[0]) if expert_ids.ndim else 0
        want = (n, meta.num_moe_layers, meta.top_k)
        if expert_ids.shape != want:
            raise InputError(f"{where}: expert ids have shape {tuple(expert_ids.shape)}, expected {want} "
                             "(tokens, MoE layers, top-k)")
        if n == 0:
            return
        self._check_ids(expert_ids, where)
        for name, col in (("seq_id", seq_id), ("position", position), ("phase", phase), ("step", step)):
            if col.shape != (n,):
                raise InputError(f"{where}: {name} has {col.shape[0] if col.ndim else 0} values for {n} "
                                 "tokens")
            if name != "phase" and int(col.min()) < 0:
                raise InputError(f"{where}: {name} {int(col.min())} is negative")
        if not np.isin(phase, list(PHASE_NAMES)).all():
            raise InputError(f"{where}: a phase is neither prefill nor decode")
        if int(step[0]) < self._last_step or (n > 1 and bool((np.diff(step) < 0).any())):
            raise InputError(f"{where}: forward-pass numbers go backwards (rows must come in pass order)")
        self._last_step = int(step[-1])
        if self._writer is None:
            meta.has_token_ids = token_id is not None
            meta.has_weights = expert_weights is not None
            meta.has_logits = router_logits is not None
            self._writer = open_writer(self.output, meta, force=self.force, compression=self.compression)
        for name, value, stored in (("token ids", token_id, meta.has_token_ids),
                                    ("gating weights", expert_weights, meta.has_weights),
                                    ("router logits", router_logits, meta.has_logits)):
            if (value is None) == stored:
                state = "lacks" if stored else "has"
                raise InputError(f"{where}: {state} {name}, unlike the batches before it")
        if expert_weights is not None:
            if expert_weights.shape != want:
                raise InputError(f"{where}: gating weights have shape {tuple(expert_weights.shape)}, "
                                 f"expected {want}")
            if not np.isfinite(expert_weights).all() or bool((expert_weights < 0).any()):
                raise InputError(f"{where}: gating weights must be finite and non-negative")
        chunk = TraceChunk(
            seq_id=seq_id.astype(np.int32), position=position.astype(np.int32),
            token_id=None if token_id is None else token_id.astype(np.int32),
            phase=phase.astype(np.uint8), step=step.astype(np.int32),
            expert_ids=expert_ids.astype(meta.id_dtype, copy=False),
            expert_weights=None if expert_weights is None else expert_weights.astype(meta.weights_dtype),
            router_logits=None if router_logits is None else router_logits.astype(np.float16),
        )
        self._pending.append(chunk)
        self._pending_tokens += n
        self.num_tokens += n
        if self.on_tokens is not None:
            self.on_tokens(n)
        if self._pending_tokens >= self.buffer_tokens:
            self._flush()

    def _check_ids(self, ids: np.ndarray, where: str) -> None:
        meta = self.metadata
        kind, t, layer, j = first_bad_id(np.ascontiguousarray(ids), meta.num_experts)
        if kind == OUT_OF_RANGE:
            raise InputError(f"{where}: token {t}, layer {meta.moe_layers[layer]}: expert id "
                             f"{int(ids[t, layer, j])} is out of range (model has {meta.num_experts} "
                             "experts)")
        if kind == TWICE:
            raise InputError(f"{where}: token {t}, layer {meta.moe_layers[layer]}: an expert appears twice "
                             "in one top-k")

    def _flush(self) -> None:
        if self._pending and self._writer is not None:
            self._writer.append(TraceChunk.concat(self._pending))
        self._pending = []
        self._pending_tokens = 0

    def close(self, sources: list[Path] | None = None) -> Path:
        """Finish the trace; an import that produced no token is an error (and leaves no file)."""
        if self._writer is None:
            more = f" (and {len(sources) - 1} more)" if sources and len(sources) > 1 else ""
            named = f"{sources[0]}{more}: " if sources else ""
            raise InputError(f"{named}no routed tokens in the source; nothing to import")
        self._flush()
        return self._writer.close(complete=True)

    def abort(self) -> None:
        """Drop the partial file after a failed import."""
        if self._writer is not None:
            try:
                self._writer.close(complete=False)
            finally:
                partial_path(self.output).unlink(missing_ok=True)
        self._pending = []

    def __enter__(self) -> TraceSink:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        if exc_type is not None:
            self.abort()
