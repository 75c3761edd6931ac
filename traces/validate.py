"""Full trace validation for `moe-sim validate`: metadata, shards, then every row, streamed chunk by chunk.

The first problem raises InputError with one line naming the file (and row/layer) and what is wrong.
Shape legend: T tokens, L MoE layers, K top-k, E experts per layer.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from traces.chunk import TraceChunk
from traces.errors import InputError
from traces.reader import DEFAULT_CHUNK_TOKENS, Trace, open_trace
from traces.schema import PHASE_NAMES, SOURCES, TraceMetadata


@dataclass
class ValidationResult:
    paths: list[str]
    num_tokens: int
    num_shards: int
    complete: bool
    unchecked: list[str]  # shards written before format 1.1: no block checksums to verify

    @property
    def integrity(self) -> str:
        """How far the content was verified, for the summary line."""
        if not self.unchecked:
            return "every block's checksum verified"
        if len(self.unchecked) == self.num_shards:
            return "unchecked: written before format 1.1, the file(s) carry no block checksums"
        return f"unchecked: {len(self.unchecked)} of {self.num_shards} files carry no block checksums"


def check_metadata(meta: TraceMetadata, source: str) -> None:
    """Metadata must describe the model completely enough to replay and cost the trace."""
    problems = []
    for name in ("model_id", "model_type", "model_dtype", "created_at", "tool_version"):
        if not getattr(meta, name):
            problems.append(f"{name} is empty")
    for name in ("num_hidden_layers", "num_experts", "hidden_size", "expert_intermediate_size"):
        if getattr(meta, name) <= 0:
            problems.append(f"{name} must be positive, not {getattr(meta, name)}")
    if not meta.moe_layers:
        problems.append("moe_layers is empty")
    elif len(set(meta.moe_layers)) != len(meta.moe_layers) or not all(
        0 <= i < meta.num_hidden_layers for i in meta.moe_layers
    ):
        problems.append(f"moe_layers {meta.moe_layers} must be distinct layers in "
                        f"0..{meta.num_hidden_layers - 1}")
    if any(not name for name in meta.moe_module_names):
        problems.append("a MoE module name is empty")
    if (meta.num_shared_experts > 0) != (meta.shared_expert_intermediate_size > 0):
        problems.append("num_shared_experts and shared_expert_intermediate_size must both be set or both be "
                        "0")
    if meta.router_first_output not in ("logits", "probabilities"):
        problems.append("router_first_output must be logits or probabilities, not "
                        f"{meta.router_first_output!r}")
    if meta.source not in SOURCES:
        problems.append(f"source must be one of {', '.join(SOURCES)}, not {meta.source!r}")
    if meta.source == "recorded":
        for name in ("transformers_version", "torch_version"):
            if not getattr(meta, name):
                problems.append(f"{name} is missing for a recorded trace")
    if not meta.routed_scaling_factor > 0:
        problems.append("routed_scaling_factor must be positive")
    if problems:
        raise InputError(f"{source}: incomplete metadata: {problems[0]}")


def check_columns(trace: Trace) -> None:
    """Stored dtypes must be the ones the metadata promises (ids uint8/uint16, weights float16/float32...)."""
    meta = trace.metadata
    for shard in trace.shards:
        names = shard.metadata.stored_fields()
        for chunk in shard.iter_blocks(names, 1):
            for name, value in chunk.present().items():
                if value.dtype != meta.field_dtype(name):
                    raise InputError(f"{shard.path}: column {name} is {value.dtype}, expected "
                                     f"{meta.field_dtype(name)}")
            break


def check_chunk(chunk: TraceChunk, meta: TraceMetadata, source: str, row0: int) -> None:
    """Raise on the first bad row of a chunk (rows numbered from the start of the shard)."""
    ids = chunk.expert_ids
    assert ids is not None
    where = _first(ids >= meta.num_experts)
    if where is not None:
        t, layer, _ = where
        raise InputError(
            f"{source}: row {row0 + t}, layer {meta.moe_layers[layer]}: expert id {int(ids[where])} is out "
            f"of range (model has {meta.num_experts} experts)"
        )
    srt = np.sort(ids, axis=-1)
    where = _first(srt[..., 1:] == srt[..., :-1])
    if where is not None:
        t, layer, j = where
        raise InputError(
            f"{source}: row {row0 + t}, layer {meta.moe_layers[layer]}: expert {int(srt[t, layer, j])} "
            "appears twice in one top-k"
        )
    for name in ("expert_weights", "router_logits"):
        value = getattr(chunk, name)
        if value is not None:
            where = _first(~np.isfinite(value))
            if where is not None:
                raise InputError(f"{source}: row {row0 + where[0]}: {name} holds {value[where]}")
    if chunk.expert_weights is not None:
        where = _first(chunk.expert_weights < 0)
        if where is not None:
            raise InputError(f"{source}: row {row0 + where[0]}: negative expert weight "
                             f"{chunk.expert_weights[where]}")
    assert chunk.phase is not None and chunk.position is not None and chunk.seq_id is not None
    assert chunk.step is not None
    where = _first(~np.isin(chunk.phase, list(PHASE_NAMES)))
    if where is not None:
        raise InputError(f"{source}: row {row0 + where[0]}: phase {int(chunk.phase[where])} is neither "
                         "prefill nor decode")
    for name in ("seq_id", "position", "step"):
        value = getattr(chunk, name)
        where = _first(value < 0)
        if where is not None:
            raise InputError(f"{source}: row {row0 + where[0]}: {name} {int(value[where])} is negative")
    if chunk.token_id is not None and meta.vocab_size > 0:
        where = _first((chunk.token_id < 0) | (chunk.token_id >= meta.vocab_size))
        if where is not None:
            raise InputError(
                f"{source}: row {row0 + where[0]}: token id {int(chunk.token_id[where])} is out of range "
                f"(vocabulary {meta.vocab_size})"
            )


def validate(
    paths: str | Path | Sequence[str | Path],
    *,
    allow_partial: bool = False,
    chunk_tokens: int = DEFAULT_CHUNK_TOKENS,
    on_chunk: Callable[[int], None] | None = None,
) -> ValidationResult:
    """Check a trace (one file or shards) fully; raise InputError on the first problem, else return a
    summary."""
    with open_trace(paths) as trace:  # opening checks files, schema version and that shards agree
        meta = trace.metadata
        for shard in trace.shards:
            check_metadata(shard.metadata, str(shard.path))
            if shard.metadata.status != "complete" and not allow_partial:
                raise InputError(f"{shard.path}: trace is partial (its writer did not finish; "
                                 "--allow-partial accepts it)")
        check_columns(trace)
        names = meta.stored_fields()
        for shard in trace.shards:
            row0 = 0
            for block in shard.iter_blocks(names, chunk_tokens):
                check_chunk(block, meta, str(shard.path), row0)
                row0 += block.num_tokens
                if on_chunk is not None:
                    on_chunk(block.num_tokens)
            if row0 != shard.num_tokens:
                raise InputError(f"{shard.path}: holds {row0} rows but declares {shard.num_tokens}")
        return ValidationResult(
            paths=[str(p) for p in trace.paths],
            num_tokens=trace.num_tokens,
            num_shards=len(trace.shards),
            complete=trace.complete,
            unchecked=[str(s.path) for s in trace.shards if not s.checked],
        )


def _first(mask: np.ndarray) -> tuple[int, ...] | None:
    """Index of the first True in a boolean array, or None."""
    flat = np.flatnonzero(mask)
    if flat.size == 0:
        return None
    return tuple(int(i) for i in np.unravel_index(int(flat[0]), mask.shape))
