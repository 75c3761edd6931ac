"""Regrouped steps, as the report replays them at a plan point's batch: prefill and decode tokens fill steps
of their own however the trace interleaves them, in the rebalance stream and in the replay alike (checked by
hand)."""

from __future__ import annotations

from typing import Any

import numpy as np
from report_fixtures import DECODE, PREFILL, random_ids, write_ids_trace

from simulator.hardware import GpuSpec
from simulator.rebalance import count_steps, iter_step_loads
from simulator.replay import ReplayConfig, Variant, replay, run_variants
from traces import open_trace

# 23 tokens whose phase switches mid-way through what would be a 4-token step
PHASES = np.array([PREFILL] * 3 + [DECODE] * 2 + [PREFILL] * 1 + [DECODE] * 3 + [PREFILL] * 6 + [DECODE] * 5
                  + [PREFILL] * 3)


def test_rebalance_steps_fill_per_phase(tmp_path):
    rng = np.random.default_rng(5)
    ids = random_ids(rng, PHASES.size, 2, 8, 2)
    path = write_ids_trace(tmp_path / "p.h5", ids, num_experts=8, phase=PHASES)
    B = 4
    # by hand: each phase's tokens in order, cut into runs of 4; a step comes out when its phase's next one
    # opens
    want = []
    for code in (PREFILL, DECODE):
        where = np.flatnonzero(np.equal(PHASES, code))  # prefill 13 tokens -> 4 steps, decode 10 -> 3 steps
        for start in range(0, where.size, B):
            members = where[start:start + B]
            nxt = where[start + B] if start + B < where.size else PHASES.size + members[0]
            load = np.stack([np.bincount(ids[members, layer].ravel(), minlength=8) for layer in range(2)])
            want.append((nxt, load, members.size))
    want.sort(key=lambda w: w[0])
    with open_trace(path) as trace:
        for chunk in (5, 64):
            got = list(iter_step_loads(trace, tokens_per_step=B, chunk_tokens=chunk))
            assert len(got) == 7 == count_steps(trace, tokens_per_step=B, chunk_tokens=chunk)
            for g, (_, load, size) in zip(got, want, strict=True):
                assert np.array_equal(g, load) and g.sum() == size * 2 * 2  # tokens x layers x top-k
        assert count_steps(trace, tokens_per_step=B, phase="decode") == 3
        assert len(list(iter_step_loads(trace, tokens_per_step=B, phase="decode"))) == 3


def test_replay_regroups_phases_apart(tmp_path):
    rng = np.random.default_rng(8)
    phases = np.tile(PHASES, 40)  # 920 tokens, phases interleaved throughout
    ids = random_ids(rng, phases.size, 2, 8, 2, skew=1.2)
    path = write_ids_trace(tmp_path / "r.h5", ids, num_experts=8, phase=phases)
    gpu = GpuSpec.from_name("h100")
    B = 16
    config: dict[str, Any] = dict(num_gpus=4, gpus_per_node=2, hardware=gpu,
                                  placements=("contiguous", "round-robin"))
    with open_trace(path) as trace:
        regrouped = replay(trace, ReplayConfig(tokens_per_step=B, **config))
        recorded = replay(trace, ReplayConfig(tokens_per_step=0, **config))
        start = regrouped.score_start
        scored = np.bincount(phases[start:], minlength=2)
        # the same kernels on one phase at a time: prefill steps, then decode steps
        apart = []
        for v, placement in zip(regrouped.placements, regrouped.fitted_placements, strict=True):
            series = []
            for code in (PREFILL, DECODE):
                seg = run_variants(trace, [Variant(v.label, placement, B, 0, phase=code)], [gpu], phase="all",
                                   score_start=start, capacity_factor=None)
                series.extend(seg.series(0)[0].tolist())
            apart.append(series)
    for s, r, series in zip(regrouped.placements, recorded.placements, apart, strict=True):
        assert s.tokens == r.tokens == phases.size - start
        assert s.steps == sum(-(-int(n) // B) for n in scored)  # full steps of one phase, one short per phase
        # totals: grouping-free
        assert s.aggregate_imbalance == r.aggregate_imbalance and s.leave_gpu_share == r.leave_gpu_share
        np.testing.assert_allclose(s.step_imbalance_series, series, rtol=1e-12)
