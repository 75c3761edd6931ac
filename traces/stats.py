"""Trace summaries for `moe-sim info`: streamed over chunks, so memory does not grow with the trace.

Shape legend: T tokens, L MoE layers, E experts per layer, K top-k.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from traces import location
from traces.reader import DEFAULT_CHUNK_TOKENS, Trace
from traces.schema import PHASE_DECODE, PHASE_PREFILL


@dataclass
class LayerLoad:
    """How evenly one MoE layer's assignments spread over its experts (`moe-sim info`, `MoEProfiler`)."""

    layer: int  # decoder-layer index
    assignments: int  # token-expert assignments in this layer (tokens x top-k)
    top_expert: int  # the most-used expert
    top_share: float  # its share of the layer's assignments (uniform: 1/E; at most 1/K)
    # top expert's assignments / mean per expert (1 = perfectly even; 0 with no assignments)
    max_over_mean: float
    idle: int  # experts that received no assignment
    entropy: float  # entropy of the expert shares divided by log(E): 1 = perfectly even


@dataclass
class TraceSummary:
    paths: list[str]
    encodings: list[str]
    status: str  # "complete", or "partial" when any shard is
    model_id: str
    source: str
    num_tokens: int
    num_sequences: int
    prefill_tokens: int
    decode_tokens: int
    num_steps: int  # distinct forward passes
    num_layers: int
    num_experts: int
    top_k: int
    weights_dtype: str | None  # None when weights are not stored
    has_token_ids: bool
    has_logits: bool
    size_bytes: int
    bytes_per_token: float
    layers: list[LayerLoad] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def expert_counts(ids: np.ndarray, num_experts: int) -> np.ndarray:
    """[L, E] assignments per expert in a block of expert ids [T, L, K]."""
    num_layers = ids.shape[1]
    offsets = (np.arange(num_layers, dtype=np.int64) * num_experts)[None, :, None]  # [1, L, 1]
    flat = (ids.astype(np.int64) + offsets).ravel()
    return np.bincount(flat, minlength=num_layers * num_experts).reshape(num_layers, num_experts)


def layer_loads(counts: np.ndarray, layers: list[int]) -> list[LayerLoad]:
    """Per-layer load summary from counts [L, E] (pure NumPy); layers: the L decoder-layer indices."""
    out = []
    counts = np.asarray(counts, dtype=np.int64)
    num_experts = counts.shape[1]
    for layer, row in zip(layers, counts, strict=True):
        total = int(row.sum())
        share = row / total if total else np.full(num_experts, 1.0 / num_experts)
        nz = share[share > 0]
        entropy = float(-(nz * np.log(nz)).sum() / np.log(num_experts)) if num_experts > 1 else 1.0
        top = int(np.argmax(row))
        out.append(LayerLoad(layer=int(layer), assignments=total, top_expert=top, top_share=float(share[top]),
                             max_over_mean=float(row[top] * num_experts / total) if total else 0.0,
                             idle=int((row == 0).sum()), entropy=entropy))
    return out


def summarize(
    trace: Trace,
    chunk_tokens: int = DEFAULT_CHUNK_TOKENS,
    on_chunk: Callable[[int], None] | None = None,
) -> TraceSummary:
    """Read ids, sequence ids, phases and steps once (never weights or logits) and summarise."""
    meta = trace.metadata
    counts = np.zeros((meta.num_moe_layers, meta.num_experts), np.int64)
    phases = np.zeros(2, np.int64)
    seqs: set[int] = set()
    steps: set[int] = set()
    for chunk in trace.iter_chunks(("seq_id", "phase", "step", "expert_ids"), chunk_tokens):
        assert chunk.expert_ids is not None and chunk.phase is not None
        assert chunk.seq_id is not None and chunk.step is not None
        counts += expert_counts(chunk.expert_ids, meta.num_experts)
        phases += np.bincount(chunk.phase, minlength=2)[:2]
        seqs.update(np.unique(chunk.seq_id).tolist())
        steps.update(np.unique(chunk.step).tolist())
        if on_chunk is not None:
            on_chunk(chunk.num_tokens)
    size = sum(location.size(p) for p in trace.paths)
    n = trace.num_tokens
    return TraceSummary(
        paths=[str(p) for p in trace.paths],
        encodings=sorted({shard.encoding for shard in trace.shards}),
        status="complete" if trace.complete else "partial",
        model_id=meta.model_id,
        source=meta.source,
        num_tokens=n,
        num_sequences=len(seqs),
        prefill_tokens=int(phases[PHASE_PREFILL]),
        decode_tokens=int(phases[PHASE_DECODE]),
        num_steps=len(steps),
        num_layers=meta.num_moe_layers,
        num_experts=meta.num_experts,
        top_k=meta.top_k,
        weights_dtype=meta.weights_dtype if meta.has_weights else None,
        has_token_ids=meta.has_token_ids,
        has_logits=meta.has_logits,
        size_bytes=size,
        bytes_per_token=size / n if n else 0.0,
        layers=layer_loads(counts, meta.moe_layers),
    )

