"""Plan on a synthetic trace with a known answer: one very hot expert, so only replication reaches the target."""

from __future__ import annotations

import numpy as np
import pytest
from test_sim_fixtures import tiny_meta, write_ids

from simulator.hardware import GpuSpec
from simulator.plan import PlanConfig, plan
from traces import open_trace
from traces.errors import InputError


def hot_expert_trace(path, tokens=16384):
    """16 experts, top-2; every token picks expert 0 plus one of the others uniformly: expert 0 holds half the load."""
    rng = np.random.default_rng(0)
    meta = tiny_meta(layers=2, experts=16, top_k=2, hidden=1024, ffn=4096)  # compute-heavy experts
    other = rng.integers(1, 16, size=(tokens, 2))
    ids = np.stack([np.zeros((tokens, 2), dtype=np.int64), other], axis=2)  # [T, L, 2]
    return write_ids(path, meta, ids, np.arange(tokens) // 512, np.zeros(tokens))


def test_only_replication_meets_the_target(tmp_path):
    path = hot_expert_trace(tmp_path / "hot.h5")
    base = dict(hardware=[GpuSpec.from_name("h100")], gpus=[8], gpus_per_node=8,
                placements=["balanced", "replicated"], redundant_experts=[0, 8], tokens_per_step=[4096])
    with open_trace(path) as tr:
        probe = plan(tr, PlanConfig(target_tokens_per_s=1.0, **base))
    by = {c.placement: c for c in probe.candidates}
    # balanced: expert 0's GPU does >= half of all work (imbalance >= 8 x 1/2 / ... ); replication spreads it
    assert by["balanced"].imbalance > 3.5
    assert by["replicated+8"].imbalance < 1.3
    assert by["replicated+8"].tokens_per_s > 1.5 * by["balanced"].tokens_per_s
    target = (by["replicated+8"].tokens_per_s * by["balanced"].tokens_per_s) ** 0.5
    with open_trace(path) as tr:
        result = plan(tr, PlanConfig(target_tokens_per_s=target, **base))
    assert result.recommendation is not None
    assert result.recommendation.placement == "replicated+8"
    assert [c.placement for c in result.candidates if c.meets_target] == ["replicated+8"]
    assert any("below target" in r or "miss the goal" in r for r in result.reasons)
    d = result.to_dict()
    assert d["recommendation"]["placement"] == "replicated+8" and d["frontier"]


def test_memory_and_latency_bounds(tmp_path):
    path = hot_expert_trace(tmp_path / "hot.h5", tokens=2048)
    tiny_gpu = GpuSpec("tiny", bf16_flops=1e15, hbm_bytes=1e6, hbm_bandwidth=3e12, scale_up_bandwidth=4e11,
                       scale_out_bandwidth=5e10)
    with open_trace(path) as tr:
        result = plan(tr, PlanConfig(target_tokens_per_s=1.0, hardware=[tiny_gpu], gpus=[8],
                                     placements=["balanced"], redundant_experts=[0], tokens_per_step=[512]))
    assert result.recommendation is None and not result.candidates[0].fits_memory
    with open_trace(path) as tr:
        result = plan(tr, PlanConfig(target_tokens_per_s=1.0, gpus=[8], placements=["balanced"],
                                     redundant_experts=[0], tokens_per_step=[512], max_step_ms=1e-6))
    assert result.recommendation is None and not result.candidates[0].meets_latency
    with pytest.raises(InputError, match="target"):
        PlanConfig(target_tokens_per_s=0)
