"""Tiny hand-built traces shared by the report, rebalance and routing-analysis tests."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from traces import PHASE_DECODE, PHASE_PREFILL, TraceChunk, TraceMetadata, write_trace


def tiny_metadata(num_layers: int, num_experts: int, top_k: int, **extra: object) -> TraceMetadata:
    """Metadata of a made-up model with the given routing shape (hidden 8, expert FFN 4, float32 weights)."""
    fields: dict = dict(
        model_id="tiny-test",
        model_type="olmoe",
        num_hidden_layers=num_layers,
        moe_layers=list(range(num_layers)),
        moe_module_names=[f"model.layers.{i}.mlp.gate" for i in range(num_layers)],
        num_experts=num_experts,
        top_k=top_k,
        hidden_size=8,
        expert_intermediate_size=4,
        model_dtype="float32",
        has_token_ids=False,
        has_weights=False,
        source="synthetic",
    )
    fields.update(extra)
    return TraceMetadata(**fields)


def write_ids_trace(
    path: Path,
    expert_ids: np.ndarray,
    *,
    num_experts: int,
    seq_id: np.ndarray | None = None,
    position: np.ndarray | None = None,
    phase: np.ndarray | None = None,
    step: np.ndarray | None = None,
    **extra: object,
) -> Path:
    """Write expert_ids [T, L, K] as a trace; missing columns default to one prefill sequence, one token a
    step."""
    ids = np.asarray(expert_ids)
    T, L, K = ids.shape
    meta = tiny_metadata(L, num_experts, K, **extra)
    arange = np.arange(T, dtype=np.int32)
    chunk = TraceChunk(
        seq_id=np.zeros(T, np.int32) if seq_id is None else np.asarray(seq_id, np.int32),
        position=arange if position is None else np.asarray(position, np.int32),
        phase=np.full(T, PHASE_PREFILL, np.uint8) if phase is None else np.asarray(phase, np.uint8),
        step=arange if step is None else np.asarray(step, np.int32),
        expert_ids=ids.astype(meta.id_dtype),
    )
    return write_trace(path, meta, chunk)


def random_ids(rng: np.random.Generator, tokens: int, layers: int, experts: int, top_k: int,
               skew: float = 1.0) -> np.ndarray:
    """[T, L, K] distinct expert ids per row, drawn with Zipf-like popularity (skew 0 = uniform)."""
    weights = 1.0 / np.arange(1, experts + 1) ** skew
    out = np.empty((tokens, layers, top_k), dtype=np.int64)
    for layer in range(layers):
        perm = rng.permutation(experts)
        p = weights[perm] / weights.sum()
        # Gumbel top-k draws k distinct experts per token with probability tilted by p.
        keys = np.log(p)[None, :] - np.log(-np.log(rng.random((tokens, experts))))
        out[:, layer, :] = np.argsort(-keys, axis=1)[:, :top_k]
    return out


PREFILL, DECODE = PHASE_PREFILL, PHASE_DECODE


def small_report_inputs(directory: Path, tokens: int = 6000):
    """A synthetic OLMoE-shaped trace and everything a report shows, computed with a plan (a target is given).

    Returns (trace path, ReportInputs). Small enough for tests: a few seconds, mostly plotting.
    """
    from simulator.hardware import GpuSpec
    from simulator.report.collect import ReportOptions, collect_inputs
    from traces import open_trace
    from traces.synthetic import SynthConfig, write_synthetic

    path = write_synthetic(directory / "synthetic.h5", SynthConfig(tokens=tokens, seed=3, batch_size=4),
                           force=True)
    options = ReportOptions(
        hardware=[GpuSpec.from_name("h100"), GpuSpec.from_name("h200")], gpus=[8, 16],
        target_tokens_per_s=1000.0, redundant_experts=[0, 16], rebalance_every=(5, 20), window=10, segments=4,
        plan_tokens_per_gpu=[16],
    )
    with open_trace(path) as trace:
        inputs = collect_inputs(trace, options, settings={"command line": "test"})
    return path, inputs
