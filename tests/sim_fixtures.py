"""Tiny trace builders shared by the simulator tests (no tests here)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from traces import TraceChunk, TraceMetadata, open_writer, write_trace


def tiny_meta(layers: int, experts: int, top_k: int, hidden: int = 8, ffn: int = 4) -> TraceMetadata:
    return TraceMetadata(
        model_id="tiny-test", model_type="olmoe", num_hidden_layers=layers, moe_layers=list(range(layers)),
        moe_module_names=[f"model.layers.{i}.mlp.gate" for i in range(layers)], num_experts=experts,
        top_k=top_k, hidden_size=hidden, expert_intermediate_size=ffn, has_weights=False, has_token_ids=False,
        num_attention_heads=2, num_key_value_heads=2, head_dim=hidden // 2, vocab_size=32, source="synthetic",
    )


def write_ids(path: Path, meta: TraceMetadata, ids: np.ndarray, steps: np.ndarray,
              phases: np.ndarray, append_rows: int | None = None) -> Path:
    """append_rows: write in appends of this many rows (an Arrow file gets a record batch per append)."""
    t = ids.shape[0]
    chunk = TraceChunk(seq_id=np.zeros(t, np.int32), position=np.arange(t, dtype=np.int32),
                       phase=phases.astype(np.uint8), step=steps.astype(np.int32),
                       expert_ids=ids.astype(meta.id_dtype))
    if append_rows is None:
        return write_trace(path, meta, chunk, force=True)
    with open_writer(path, meta, force=True) as writer:
        for start in range(0, t, append_rows):
            writer.append(chunk.slice(start, start + append_rows))
    return Path(path)


def random_ids(rng: np.random.Generator, tokens: int, layers: int, experts: int, top_k: int,
               skew: float = 1.0) -> np.ndarray:
    """[T, L, K] distinct experts per row, Zipf-like popularity with a different hot set per layer."""
    pop = 1.0 / np.arange(1, experts + 1) ** skew
    out = np.empty((tokens, layers, top_k), dtype=np.int64)
    for layer in range(layers):
        logp = np.log(pop[rng.permutation(experts)])
        keys = rng.gumbel(size=(tokens, experts)) + logp
        out[:, layer, :] = np.argsort(-keys, axis=1)[:, :top_k]
    return out


def random_trace(path: Path, *, tokens: int = 3000, layers: int = 3, experts: int = 16, top_k: int = 4,
                 seed: int = 0, step_len: int = 50, skew: float = 1.0, hidden: int = 8, ffn: int = 4,
                 append_rows: int | None = None) -> Path:
    rng = np.random.default_rng(seed)
    meta = tiny_meta(layers, experts, top_k, hidden, ffn)
    ids = random_ids(rng, tokens, layers, experts, top_k, skew)
    steps = np.cumsum(rng.random(tokens) < 1.0 / step_len)  # ragged recorded steps
    phases = (rng.random(tokens) < 0.4).astype(np.uint8)
    return write_ids(path, meta, ids, steps, phases, append_rows)



def fitted_variants(meta: TraceMetadata, layouts: tuple[tuple[str, int, int, int], ...], tps: int) -> list:
    """One replay Variant per (policy, GPUs, GPUs per node, redundant slots) in layouts, fitted on a load
    where experts 0-2 are five times as hot as the others; labelled by policy."""
    from simulator.placement import fit_placement
    from simulator.replay import Variant

    load = np.ones((meta.num_moe_layers, meta.num_experts))
    load[:, :3] = 5.0
    return [Variant(policy, fit_placement(policy, load, num_gpus=g, gpus_per_node=gpn, redundant_experts=r),
                    tps, r) for policy, g, gpn, r in layouts]
