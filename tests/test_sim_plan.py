"""Plan on a synthetic trace with a known answer: one very hot expert, so only replication reaches the
target."""

from __future__ import annotations

import dataclasses
import json
from typing import Any

import numpy as np
import pytest
from sim_fixtures import random_ids, tiny_meta, write_ids
from test_sim_cli import moe_sim

from simulator.hardware import GpuSpec
from simulator.plan import Candidate, PlanConfig, apply_prices, pareto_frontier, parse_gpu_hour_cost, plan
from traces import open_trace
from traces.errors import InputError


def hot_expert_trace(path, tokens=24576):
    """16 experts, top-2; every token picks expert 0 plus one of the others uniformly: expert 0 holds half the
    load."""
    rng = np.random.default_rng(0)
    meta = tiny_meta(layers=2, experts=16, top_k=2, hidden=1024, ffn=4096)  # compute-heavy experts
    other = rng.integers(1, 16, size=(tokens, 2))
    ids = np.stack([np.zeros((tokens, 2), dtype=np.int64), other], axis=2)  # [T, L, 2]
    return write_ids(path, meta, ids, np.arange(tokens) // 512, np.zeros(tokens))


def test_only_replication_meets_the_target(tmp_path):
    path = hot_expert_trace(tmp_path / "hot.h5")
    base: dict[str, Any] = dict(hardware=[GpuSpec.from_name("h100")], gpus=[8], gpus_per_node=8,
                                placements=["balanced", "replicated"], redundant_experts=[0, 8],
                                tokens_per_step=[4096])
    with open_trace(path) as tr:
        probe = plan(tr, PlanConfig(target_tokens_per_s=1.0, **base))
    by = {c.placement: c for c in probe.candidates}
    # balanced: expert 0's GPU does >= half of all work (imbalance >= 8 x 1/2 / ... ); replication spreads it
    assert by["balanced"].aggregate_imbalance > 3.5
    assert by["replicated+8"].aggregate_imbalance < 1.3
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
    path = hot_expert_trace(tmp_path / "hot.h5", tokens=3072)
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


def uniform_trace(path, tokens=24576, phases=None):
    """16 compute-heavy experts, top-2, uniform routing: every GPU does the same work, so throughput follows
    the number of GPUs when each brings its own batch."""
    rng = np.random.default_rng(1)
    meta = tiny_meta(layers=2, experts=16, top_k=2, hidden=1024, ffn=4096)
    ids = random_ids(rng, tokens, 2, 16, 2, skew=0.0)
    return write_ids(path, meta, ids, np.arange(tokens) // 256,
                     np.zeros(tokens) if phases is None else phases)


ONE_NODE: dict[str, Any] = dict(gpus=[4, 8], gpus_per_node=8, placements=["balanced"], redundant_experts=[0])


def test_only_more_gpus_meet_the_target_with_per_gpu_batches(tmp_path):
    path = uniform_trace(tmp_path / "u.h5")
    with open_trace(path) as tr:
        probe = plan(tr, PlanConfig(target_tokens_per_s=1.0, tokens_per_gpu=[512], **ONE_NODE))
    by = {c.num_gpus: c for c in probe.candidates}
    assert (by[4].tokens_per_step, by[8].tokens_per_step) == (2048, 4096)  # b x G tokens per step
    assert (by[8].steps, by[8].mean_tokens_per_step) == (5, 18432 / 5)  # 18432 scored: 4 full steps + 2048
    # same per-GPU work per step, twice the GPUs: close to twice the throughput
    assert by[8].tokens_per_s > 1.7 * by[4].tokens_per_s
    target = (by[4].tokens_per_s * by[8].tokens_per_s) ** 0.5
    with open_trace(path) as tr:
        result = plan(tr, PlanConfig(target_tokens_per_s=target, tokens_per_gpu=[512], **ONE_NODE))
    rec = result.recommendation
    assert rec is not None and rec.num_gpus == 8 and rec.tokens_per_gpu == 512
    assert [c.num_gpus for c in result.frontier] == [4, 8]  # more GPUs, more throughput: both on the frontier
    assert any("meets the target" in r and f"by {rec.tokens_per_s / target - 1:.0%}" in r
               for r in result.reasons)
    assert any("fewer GPUs" in r and "below target" in r for r in result.reasons)
    assert any("prices were not given for h100" in r for r in result.reasons)
    # absolute steps stay the size given, whatever the GPU count
    with open_trace(path) as tr:
        fixed = plan(tr, PlanConfig(target_tokens_per_s=target, tokens_per_step=[2048], **ONE_NODE))
    assert {(c.tokens_per_step, c.tokens_per_gpu,
             c.mean_tokens_per_step) for c in fixed.candidates} == {(2048, 0, 2048)}


def test_cost_ranking_prefers_cheaper_hardware_with_more_gpus(tmp_path):
    path = uniform_trace(tmp_path / "u.h5")
    h100 = dataclasses.replace(GpuSpec.from_name("h100"), price_per_gpu_hour=1.0)
    b200 = dataclasses.replace(GpuSpec.from_name("b200"), price_per_gpu_hour=10.0)
    grid: dict[str, Any] = dict(tokens_per_gpu=[512], **ONE_NODE)
    with open_trace(path) as tr:
        probe = plan(tr, PlanConfig(target_tokens_per_s=1.0, hardware=[h100, b200], **grid))
    tps = {(c.hardware, c.num_gpus): c.tokens_per_s for c in probe.candidates}
    target = 0.95 * min(tps["b200", 4], tps["h100", 8])
    assert tps["h100", 4] < target  # 4 x h100 falls short; 4 x b200 and 8 x h100 both make it
    with open_trace(path) as tr:
        priced = plan(tr, PlanConfig(target_tokens_per_s=target, hardware=[h100, b200], **grid))
    rec = priced.recommendation
    assert rec is not None and (rec.hardware, rec.num_gpus) == ("h100", 8)  # 8/h beats 4 x 10 = 40/h
    assert rec.price_per_hour == pytest.approx(8.0)
    assert rec.cost_per_million_tokens == pytest.approx(8.0 / (rec.tokens_per_s * 3600) * 1e6)
    assert any("ranked by cost per hour" in r for r in priced.reasons)
    assert any(r.startswith("runner-up 4 x b200") and "+400%" in r for r in priced.reasons)
    # one GPU type without a price: back to fewest GPUs, and the reasons say why
    with open_trace(path) as tr:
        unpriced = plan(tr, PlanConfig(target_tokens_per_s=target, hardware=[h100, GpuSpec.from_name("b200")],
                                       **grid))
    rec = unpriced.recommendation
    assert rec is not None and (rec.hardware, rec.num_gpus) == ("b200", 4)
    assert any("prices were not given for b200" in r for r in unpriced.reasons)


def test_phases_are_regrouped_apart_in_one_pass(tmp_path):
    """Phases switching every 64 tokens must not cut 512-token steps short: each phase is its own kernel
    variant."""
    tokens = 24576
    phases = (np.arange(tokens) // 64) % 2
    path = uniform_trace(tmp_path / "p.h5", tokens=tokens, phases=phases)
    grid: dict[str, Any] = dict(gpus=[2], gpus_per_node=8, placements=["contiguous"], redundant_experts=[0],
                                tokens_per_gpu=[256], fit_fraction=0.0)
    with open_trace(path) as tr:
        both = plan(tr, PlanConfig(target_tokens_per_s=1.0, **grid))
        apart = [plan(tr, PlanConfig(target_tokens_per_s=1.0, phase=p, **grid))
                 for p in ("prefill", "decode")]
    (c,) = both.candidates
    assert c.mean_tokens_per_step == 512 and c.steps == tokens // 512
    assert c.steps == sum(r.candidates[0].steps for r in apart)
    moe_seconds = c.moe_ms * c.steps
    assert moe_seconds == pytest.approx(sum(r.candidates[0].moe_ms * r.candidates[0].steps for r in apart))


def test_short_trace_skips_large_steps_with_a_reason(tmp_path):
    path = uniform_trace(tmp_path / "u.h5", tokens=8192)  # 6144 scored tokens
    with open_trace(path) as tr:
        result = plan(tr, PlanConfig(target_tokens_per_s=1.0, tokens_per_gpu=[128, 1024], **ONE_NODE))
        assert {(c.num_gpus, c.tokens_per_gpu) for c in result.candidates} == {(4, 128), (8, 128)}
        assert any("1024 tokens/GPU x 8 GPUs = 8,192 tokens per step needs 4 full steps" in s
                   and "6,144 scored prefill tokens (0 full steps)" in s for s in result.skipped)
        with pytest.raises(InputError, match="no grid point can be built or planned.*longer trace"):
            plan(tr, PlanConfig(target_tokens_per_s=1.0, tokens_per_gpu=[4096], **ONE_NODE))


def test_batch_options_are_exclusive_and_prices_checked(tmp_path):
    with pytest.raises(InputError, match="mutually exclusive"):
        PlanConfig(target_tokens_per_s=1.0, tokens_per_step=[0], tokens_per_gpu=[128])
    assert PlanConfig(target_tokens_per_s=1.0, phase="decode").tokens_per_gpu == [32, 128, 512]
    assert parse_gpu_hour_cost("H100=2.5, b200=6") == {"h100": 2.5, "b200": 6.0}
    for bad in ("h100", "h100=-1", "h100=x", ""):
        with pytest.raises(InputError, match="gpu-hour-cost"):
            parse_gpu_hour_cost(bad)
    with pytest.raises(InputError, match="mi300x not in --hardware"):
        apply_prices([GpuSpec.from_name("h100")], {"mi300x": 3.0})
    path = uniform_trace(tmp_path / "u.h5", tokens=2048)
    for command in ("plan", "report"):
        extra = ["-o", str(tmp_path / "r.html")] if command == "report" else []
        out = moe_sim(command, str(path), "--target-tokens-per-s", "1e3", "--tokens-per-step", "512",
                      "--tokens-per-gpu", "128", *extra)
        assert out.returncode == 2, out.stderr
        assert (out.stderr.startswith("error:") and "mutually exclusive" in out.stderr
                and "Traceback" not in out.stderr)
    out = moe_sim("plan", str(path), "--target-tokens-per-s", "1e3", "--gpu-hour-cost", "h100=abc")
    assert out.returncode == 2 and "--gpu-hour-cost" in out.stderr


def test_prices_from_a_hardware_file_and_the_priced_table(tmp_path):
    gpu = tmp_path / "cheap.json"
    spec = GpuSpec.from_name("h100").to_dict() | {"name": "cheap", "price_per_gpu_hour": 1.5}
    gpu.write_text(json.dumps(spec))
    path = uniform_trace(tmp_path / "u.h5")
    out = moe_sim("plan", str(path), "--target-tokens-per-s", "1e3", "--hardware", f"h100,{gpu}",
                  "--gpus", "4,8", "--tokens-per-gpu", "128", "--gpu-hour-cost", "h100=2", "--placements",
                  "balanced",
                  "--quiet", columns=120)
    assert out.returncode == 0, out.stderr
    assert max(len(line) for line in out.stdout.splitlines()) <= 120 and "\u2026" not in out.stdout
    assert "cost" in out.stdout and "M tokens" in out.stdout
    assert "ranked by cost per hour" in out.stdout
    # 4 x 1.5/h is the cheapest that meets 1k tokens/s
    assert "4 x cheap" in out.stdout.split("Recommendation")[1]


def _candidate(num_gpus: int, tokens_per_s: float, p95: float, fits: bool = True, price: float | None = None,
               placement: str = "balanced") -> Candidate:
    return Candidate(
        hardware="h100", num_gpus=num_gpus, gpus_per_node=8, placement=placement, policy=placement,
        redundant_experts=0, tokens_per_step=0, mean_tokens_per_step=1.0, step_ms=p95, step_ms_p95=p95,
        step_ms_p99=p95, moe_ms=p95, non_expert_ms=0.0, breakdown_ms={}, tokens_per_s=tokens_per_s,
        tokens_per_s_per_gpu=tokens_per_s / num_gpus, step_imbalance=1.0, aggregate_imbalance=1.0,
        sglang_balancedness=1.0, vllm_balancedness=1.0, leave_node_share=0.0, memory_per_gpu_bytes=1.0,
        usable_hbm_bytes=2.0, fits_memory=fits,
        meets_throughput=True, meets_latency=True, meets_target=fits, price_per_hour=price,
    )


def test_pareto_frontier_by_hand():
    a = _candidate(8, 100, 10)
    b = _candidate(8, 150, 20)  # more throughput for a longer step: both a and b stay
    c = _candidate(16, 140, 25)  # b has fewer GPUs, more throughput and a shorter step: dominated
    d = _candidate(8, 90, 30)  # dominated by a
    e = _candidate(4, 1000, 1, fits=False)  # would dominate everything, but does not fit in memory
    f = _candidate(16, 200, 20)  # more GPUs buy throughput: stays
    twin = _candidate(8, 100, 10, placement="replicated")  # the same keys as a: kept once (the first)
    frontier = pareto_frontier([a, b, c, d, e, f, twin])
    assert frontier == [b, a, f]  # by size, then throughput
    # priced: size is the cost per hour, so 16 cheap GPUs can come before 8 dear ones
    cheap, dear = _candidate(16, 120, 10, price=16.0), _candidate(8, 120, 10, price=40.0)
    assert pareto_frontier([dear, cheap], priced=True) == [cheap]
    assert pareto_frontier([dear, cheap], priced=False) == [dear]


def test_non_expert_work_by_hand():
    from simulator.cost_model import non_expert_work

    meta = tiny_meta(2, 4, 2, hidden=8, ffn=4)  # 2 heads of 4 (q 8, kv 8), vocab 32, every layer MoE
    work = non_expert_work(meta, context_tokens=100)
    # per layer q, o (8 x 8 each) and k, v (8 x 8 each) = 256 weights; routers 2 x 8 x 4 = 64; LM head 8 x 32
    # = 256
    per_token = 2 * 256 + 64 + 256
    scores = 4 * 8 * 100 * 2  # 2 matmuls of q_dim x context, 2 FLOPs each, per layer
    assert work.flops_per_token == 2 * per_token + scores
    assert work.weight_bytes == (per_token + 8 * 32) * 2  # plus the embedding table, BF16
    assert work.assumptions == ("attention over a context of 100 tokens per token",)
    gpu = GpuSpec("easy", bf16_flops=1e12, hbm_bytes=1e9, hbm_bandwidth=1e11, scale_up_bandwidth=1e9,
                  scale_out_bandwidth=1e8)
    # roofline: max(FLOPs x tokens / effective FLOP/s, weight bytes / effective HBM bandwidth)
    compute = work.flops_per_token * 1000 / (1e12 * 790 / 989)
    reads = work.weight_bytes / (1e11 * 3.0 / 3.35)
    assert work.step_seconds(gpu, 1000) == pytest.approx(max(compute, reads))
