"""Replay: a hand-worked tiny case, kernels against the NumPy reference, exact merging across
chunks/segments."""

from __future__ import annotations

import numpy as np
import pytest
from sim_fixtures import fitted_variants, random_trace, tiny_meta, write_ids

from simulator import kernels as K
from simulator.cost_model import (
    SCALE_OUT_DISPATCH_EFFICIENCY,
    SCALE_UP_COMBINE_EFFICIENCY,
    SCALE_UP_DISPATCH_EFFICIENCY,
    cost_matrix,
    model_vector,
)
from simulator.hardware import GpuSpec
from simulator.placement import Placement
from simulator.replay import PHASES, ReplayConfig, Segment, Variant, VariantArrays, replay, run_variants
from simulator.replay_reference import reference_replay
from traces import open_trace
from traces.errors import InputError

# 2 layers, 4 experts, top-2, 2 GPUs in one node; contiguous: GPU0 = {0, 1}, GPU1 = {2, 3}. Source GPU = t mod
# 2.
TINY_IDS = np.array([
    [[0, 1], [0, 1]],  # t0 (src 0): layer 0 both local;           layer 1 both local
    [[0, 2], [0, 1]],  # t1 (src 1): layer 0 e0 -> GPU0, e2 local;  layer 1 both -> GPU0 (one copy)
    [[2, 3], [0, 1]],  # t2 (src 0): layer 0 both -> GPU1 (one copy); layer 1 local
    [[1, 3], [0, 1]],  # t3 (src 1): layer 0 e1 -> GPU0, e3 local;  layer 1 both -> GPU0 (one copy)
])
# A GPU whose numbers make the arithmetic easy to follow.
EASY_GPU = GpuSpec("easy", bf16_flops=1e12, hbm_bytes=1e9, hbm_bandwidth=1e11, scale_up_bandwidth=1e9,
                   scale_out_bandwidth=1e8, scale_up_latency=1e-6, scale_out_latency=1e-5)


def _tiny(tmp_path):
    meta = tiny_meta(layers=2, experts=4, top_k=2, hidden=8, ffn=4)
    return write_ids(tmp_path / "tiny.h5", meta, TINY_IDS, np.zeros(4), np.zeros(4))


def test_hand_worked_tiny_trace(tmp_path):
    path = _tiny(tmp_path)
    config = ReplayConfig(num_gpus=2, gpus_per_node=2, hardware=EASY_GPU, placements=("contiguous",),
                          fit_fraction=0.0, capacity_factor=1.0, chunk_tokens=3)
    with open_trace(path) as tr:
        s = replay(tr, config).placements[0]
    # GPU assignments: layer 0 GPU0 = 2 (t0) + 1 (t1) + 1 (t3) = 4, GPU1 = 4; layer 1 GPU0 = 8, GPU1 = 0.
    assert s.aggregate_imbalance == pytest.approx((4 + 8) / (4 + 4))
    assert s.step_imbalance == s.aggregate_imbalance  # one step: the two figures agree
    assert s.steps == 1 and s.tokens == 4 and s.assignments == 16
    # leaving the GPU: layer 0 t1 e0, t2 e2 + e3, t3 e1 = 4; layer 1 t1 x2, t3 x2 = 4
    assert s.leave_gpu_share == pytest.approx(8 / 16)
    assert s.leave_node_share == 0.0
    # unique (token, GPU) copies: layer 0: t1, t2, t3 = 3; layer 1: t1, t3 = 2; 16 bytes per copy each way
    assert s.scale_up_bytes_per_step == pytest.approx(5 * 16 * 2)
    # capacity 1.0: ceil(1.0 x 4 tokens x 2 / 4 slots) = 2 per slot; layer 1 slots e0, e1 hold 4 each -> 4
    # dropped
    assert s.dropped_assignments == 4
    assert s.expert_flops_per_step == (16 - 4) * 6 * 8 * 4
    assert s.weight_bytes_read_per_step == (4 + 2) * 3 * 8 * 4 * 2  # layer 0: 4 experts with work, layer 1: 2
    t = s.timings[0]
    flops = 6 * 8 * 4  # per assignment
    expert_bytes = 3 * 8 * 4 * 2
    eff_flops = EASY_GPU.bf16_flops * (790 / 989)
    eff_hbm = EASY_GPU.hbm_bandwidth * (3.0 / 3.35)
    # layer 0: each GPU 4 kept assignments, 2 active experts; layer 1: GPU0 2+2 kept, 2 active
    expert_l0 = max(4 * flops / eff_flops, 2 * expert_bytes / eff_hbm)
    expert_l1 = max(4 * flops / eff_flops, 2 * expert_bytes / eff_hbm)
    # dispatch: busiest GPU sends or receives 2 copies in both layers
    disp = 2 * 16 / (1e9 * SCALE_UP_DISPATCH_EFFICIENCY) + 1e-6
    comb = 2 * 16 / (1e9 * SCALE_UP_COMBINE_EFFICIENCY) + 1e-6
    assert t.step_time["mean"] == pytest.approx(expert_l0 + expert_l1 + 2 * disp + 2 * comb)
    assert t.breakdown["dispatch"] == pytest.approx(2 * disp)
    assert t.tokens_per_s_per_gpu == pytest.approx(4 / t.step_time["mean"] / 2)


def test_hand_worked_two_nodes(tmp_path):
    """1 layer, 4 experts, top-2, 4 GPUs in 2 nodes, expert e on GPU e; token t starts on GPU t."""
    ids = np.array([[[1, 2]],   # t0 (GPU0, node0): e1 -> GPU1 (scale-up), e2 -> node1 (scale-out)
                    [[2, 3]],   # t1 (GPU1, node0): both on node1: one scale-out copy
                    [[0, 2]],   # t2 (GPU2, node1): e2 local, e0 -> node0 (scale-out)
                    [[2, 3]]])  # t3 (GPU3, node1): e3 local, e2 -> GPU2 (scale-up)
    path = write_ids(tmp_path / "two.h5", tiny_meta(1, 4, 2), ids, np.zeros(4), np.zeros(4))
    config = ReplayConfig(num_gpus=4, gpus_per_node=2, hardware=EASY_GPU, placements=("contiguous",),
                          fit_fraction=0.0)
    with open_trace(path) as tr:
        s = replay(tr, config).placements[0]
    assert s.aggregate_imbalance == pytest.approx(4 / (8 / 4))  # GPU loads 1, 1, 4, 2
    assert s.leave_gpu_share == pytest.approx(6 / 8)
    assert s.leave_node_share == pytest.approx(4 / 8)
    assert s.scale_up_bytes_per_step == pytest.approx(2 * 16 * 2)  # t0 -> GPU1, t3 -> GPU2
    assert s.scale_out_bytes_per_step == pytest.approx(3 * 16 * 2)  # t0, t1 -> node1, t2 -> node0
    # busiest: one scale-up copy per GPU; node0 sends 2 copies over its 2 NICs = 1 per NIC
    up = 16 / (1e9 * SCALE_UP_DISPATCH_EFFICIENCY) + 1e-6
    out = 1 * 16 / (1e8 * SCALE_OUT_DISPATCH_EFFICIENCY) + 1e-5
    assert s.timings[0].breakdown["dispatch"] == pytest.approx(max(up, out))


def test_step_imbalance_is_the_token_weighted_per_step_figure(tmp_path):
    """1 layer, 2 experts, top-1, 2 GPUs, expert e on GPU e. Load moves between steps: the aggregate cannot
    see it."""
    # step 0: both on e0; step 1: both on e1; step 2: three on e0, one on e1
    experts = [0, 0,  1, 1,  0, 0, 0, 1]
    ids = np.array(experts).reshape(8, 1, 1)
    steps = np.array([0, 0, 1, 1, 2, 2, 2, 2])
    path = write_ids(tmp_path / "moving.h5", tiny_meta(1, 2, 1), ids, steps, np.zeros(8))

    def run(tokens_per_step):
        config = ReplayConfig(num_gpus=2, gpus_per_node=2, hardware=EASY_GPU, placements=("contiguous",),
                              fit_fraction=0.0, tokens_per_step=tokens_per_step)
        with open_trace(path) as tr:
            return replay(tr, config).placements[0]

    s = run(0)
    # per step (busiest, mean): (2, 1), (2, 1), (3, 2); token-weighted: (2 + 2 + 3) / (1 + 1 + 2)
    assert s.step_imbalance == pytest.approx(7 / 4)
    # unweighted, not the headline
    assert s.step_imbalance_percentiles["mean"] == pytest.approx((2 + 2 + 1.5) / 3)
    assert s.per_layer[0]["step_imbalance"] == pytest.approx(7 / 4)
    # whole trace: GPU0 5, GPU1 3 -> 5 / 4, whatever the step size
    assert s.aggregate_imbalance == pytest.approx(5 / 4)
    assert s.per_layer[0]["aggregate_imbalance"] == pytest.approx(5 / 4)
    one = run(8)  # all eight tokens one step: the step imbalance falls to the aggregate
    assert one.step_imbalance == pytest.approx(5 / 4) and one.aggregate_imbalance == pytest.approx(5 / 4)
    two = run(2)  # regrouped in pairs: (0, 0), (1, 1), (0, 0), (0, 1) -> (2 + 2 + 2 + 1) / 4
    assert two.step_imbalance == pytest.approx((2 + 2 + 2 + 1) / 4)
    assert two.steps == 4 and two.step_imbalance_percentiles["p50"] == pytest.approx(2.0)


def test_hand_worked_replica_rule(tmp_path):
    """Expert 0 on both GPUs: each token uses the replica on its own GPU, so layer 1 never leaves the GPU."""
    path = _tiny(tmp_path)
    slots = np.array([[[0, 1, -1], [2, 3, 0]], [[0, 1, -1], [2, 3, 0]]])
    placement = Placement("mine", slots, 4, 2)
    meta = tiny_meta(2, 4, 2)
    with open_trace(path) as tr:
        seg = run_variants(tr, [Variant("mine", placement, 0, 1)], [EASY_GPU], phase="all", score_start=0,
                           capacity_factor=None, chunk_tokens=2)
    tot = seg.tot_gpu[0]
    # layer 1: t1 and t3 (src 1) use expert 0's GPU1 replica; only e1 leaves -> GPU0 = 4 + 2, GPU1 = 2
    assert tot[1].tolist() == [6, 2]
    assert seg.tot_int[0, 1, K.I_LEAVE_GPU] == 2
    assert meta.flops_per_assignment == 6 * 8 * 4


def _variants(path, tps):
    with open_trace(path) as tr:
        return fitted_variants(tr.metadata, (("contiguous", 4, 4, 0), ("replicated", 4, 2, 4),
                                             ("balanced", 8, 2, 0), ("round-robin", 2, 1, 0)), tps)


@pytest.mark.parametrize("tps,phase,score_start,cf", [(0, "all", 0, None), (64, "all", 700, 1.25),
                                                      (0, "decode", 123, 2.0), (37, "prefill", 0, None)])
def test_kernels_match_numpy_reference(tmp_path, tps, phase, score_start, cf):
    path = random_trace(tmp_path / "r.h5", tokens=2500, seed=tps + score_start)
    variants = _variants(path, tps)
    gpu = GpuSpec.from_name("h100")
    with open_trace(path) as tr:
        seg = run_variants(tr, variants, [gpu, EASY_GPU], phase=phase, score_start=score_start,
                           capacity_factor=cf, chunk_tokens=97)
        chunk = tr.read_all(["expert_ids", "step", "phase"])
        meta = tr.metadata
    assert chunk.expert_ids is not None and chunk.step is not None and chunk.phase is not None
    model = model_vector(meta, cf)
    cost = cost_matrix([gpu, EASY_GPU])
    for i, v in enumerate(variants):
        ref = reference_replay(chunk.expert_ids, chunk.step, chunk.phase, v.placement, model=model,
                               cost_row=cost[1], phase_filter=PHASES[phase], score_start=score_start,
                               tokens_per_step=tps)
        g = v.placement.num_gpus
        ti = seg.tot_int[i]
        assert np.array_equal(seg.tot_gpu[i, :, :g], ref.tot_gpu)
        assert np.array_equal(ti[:, K.I_LEAVE_GPU], ref.leave_gpu)
        assert np.array_equal(ti[:, K.I_LEAVE_NODE], ref.leave_node)
        assert np.array_equal(ti[:, K.I_SU_PAIRS], ref.su_pairs)
        assert np.array_equal(ti[:, K.I_SO_PAIRS], ref.so_pairs)
        assert np.array_equal(ti[:, K.I_DROPPED], ref.dropped)
        assert np.array_equal(ti[:, K.I_ACTIVE], ref.active)
        assert np.array_equal(ti[:, K.I_PEAK], ref.peak)
        imb, tim, ntok = seg.series(i)
        assert np.array_equal(ntok, ref.step_ntok)
        np.testing.assert_allclose(imb, ref.step_imbalance, rtol=1e-12)
        np.testing.assert_allclose(seg.sglang_layer_sums(i), ref.step_sglang_sum, rtol=1e-12)
        np.testing.assert_allclose(tim[1], ref.step_time, rtol=1e-9)
    if cf:
        assert seg.tot_int[:, :, K.I_DROPPED].sum() > 0  # the capacity case really drops something


def test_chunk_size_and_segment_merge_are_exact(tmp_path):
    path = random_trace(tmp_path / "m.h5", tokens=1800, seed=7, step_len=40)
    variants = _variants(path, 0)
    gpu = GpuSpec.from_name("h200")
    with open_trace(path) as tr:
        whole = run_variants(tr, variants, [gpu], phase="all", score_start=0, capacity_factor=1.5,
                             chunk_tokens=5000)
        small = run_variants(tr, variants, [gpu], phase="all", score_start=0, capacity_factor=1.5,
                             chunk_tokens=13)
        data = tr.read_all(["expert_ids", "step", "phase"])
        meta = tr.metadata
    # two segments split in the middle of a step, replayed apart and merged
    assert data.step is not None and data.expert_ids is not None and data.phase is not None
    assert data.step[900] == data.step[899]
    arrays = VariantArrays.build(variants, meta.num_experts)
    model, cost = model_vector(meta, 1.5), cost_matrix([gpu])
    first = Segment.empty(arrays, model, cost, meta.num_moe_layers)
    first.feed(data.expert_ids[:900], data.step[:900], data.phase[:900], 0, -1, 0)
    second = Segment.empty(arrays, model, cost, meta.num_moe_layers)
    second.feed(data.expert_ids[900:], data.step[900:], data.phase[900:], 900, -1, 0)
    first.absorb(second)
    merged = first
    merged.finish()
    for other in (small, merged):
        assert np.array_equal(other.tot_gpu, whole.tot_gpu)
        assert np.array_equal(other.tot_int, whole.tot_int)
        np.testing.assert_allclose(other.comp, whole.comp, rtol=1e-12)
        for i in range(len(variants)):
            a, b = other.series(i), whole.series(i)
            for x, y in zip(a, b, strict=True):
                np.testing.assert_allclose(x, y, rtol=1e-12)
            np.testing.assert_allclose(other.sglang_layer_sums(i), whole.sglang_layer_sums(i), rtol=1e-12)


def test_fit_and_score_split_is_honest(tmp_path):
    path = random_trace(tmp_path / "f.h5", tokens=2000, seed=3)
    config = ReplayConfig(num_gpus=4, gpus_per_node=4, placements=("balanced",), fit_fraction=0.25)
    with open_trace(path) as tr:
        result = replay(tr, config)
        steps = tr.read_all(["step"]).step
    assert steps is not None
    assert result.fit_tokens == 500
    assert result.score_start >= 500
    assert steps[result.score_start] != steps[result.score_start - 1]  # scoring starts on a step boundary
    assert result.placements[0].tokens == 2000 - result.score_start
    d = result.to_dict()
    assert d["placements"][0]["label"] == "balanced"
    assert len(d["placements"][0]["step_imbalance_series"]) == result.placements[0].steps


def test_bad_replay_inputs(tmp_path):
    path = random_trace(tmp_path / "b.h5", tokens=200)
    with pytest.raises(InputError, match="capacity-factor"):
        ReplayConfig(capacity_factor=0)
    with pytest.raises(InputError, match="not divisible into nodes"):
        ReplayConfig(num_gpus=12, gpus_per_node=8)
    # one per GPU, as `moe-sim replay`
    assert ReplayConfig(num_gpus=4, gpus_per_node=4).resolved(16)[0].redundant_experts == 4
    assert ReplayConfig(num_gpus=4, gpus_per_node=4, redundant_experts=0).redundant_experts == 0
    with open_trace(path) as tr, pytest.raises(InputError, match="17 redundant slots"):
        replay(tr, ReplayConfig(num_gpus=2, placements=("replicated",), redundant_experts=17))  # 16 at most


def test_uneven_layout_replays(tmp_path):
    """16 experts on 3 GPUs (6, 5, 5 slots): balanced and replicated replay, with one empty slot where a GPU
    holds one less, and the labels count replicas, not empty slots."""
    path = random_trace(tmp_path / "u.h5", tokens=600)
    with open_trace(path) as tr:
        result = replay(tr, ReplayConfig(num_gpus=3, gpus_per_node=3, placements=("balanced", "replicated"),
                                         redundant_experts=4))
    assert [p.label for p in result.placements] == ["balanced", "replicated+4"]
    balanced, replicated = result.fitted_placements
    assert sorted((balanced.slots[0] >= 0).sum(axis=1).tolist()) == [5, 5, 6]
    assert sorted((replicated.slots[0] >= 0).sum(axis=1).tolist()) == [6, 7, 7]
    assert all(p.tokens == result.placements[0].tokens > 0 for p in result.placements)


def test_decode_fit_uses_decode_tokens_behind_a_long_prefill(tmp_path):
    """A trace that opens with a long batched prefill: --phase decode fits on the first quarter of the decode
    tokens, not on the (prefill-only) first quarter of the trace; an empty fit part is refused."""
    from sim_fixtures import random_ids, tiny_meta, write_ids

    rng = np.random.default_rng(4)
    meta = tiny_meta(2, 8, 2)
    ids = random_ids(rng, 2000, 2, 8, 2)
    phases = np.r_[np.zeros(1200), np.ones(800)].astype(np.uint8)  # 60% prefill first, then decode
    steps = np.r_[np.zeros(1200), 1 + np.arange(800) // 8]
    path = write_ids(tmp_path / "p.h5", meta, ids, steps, phases)
    with open_trace(path) as tr:
        res = replay(tr, ReplayConfig(num_gpus=2, gpus_per_node=2, placements=("balanced",), phase="decode",
                                      fit_fraction=0.25))
    assert res.fit_tokens == 1200 + 200  # the first 200 decode tokens
    assert res.fit_load is not None
    assert int(res.fit_load.sum()) == 200 * 2 * 2  # tokens x layers x top-k, all decode
    assert res.placements[0].tokens == 600
    only_prefill = write_ids(tmp_path / "q.h5", meta, ids[:1200], steps[:1200], phases[:1200])
    with open_trace(only_prefill) as tr, pytest.raises(InputError, match="holds no decode assignments"):
        replay(tr, ReplayConfig(num_gpus=2, gpus_per_node=2, placements=("balanced",), phase="decode"))


def test_a_policy_that_cannot_apply_is_skipped_with_its_reason(tmp_path):
    """17 redundant slots for 16 experts on 2 GPUs: replicated cannot be built (some GPU would hold an expert
    twice), contiguous still replays, and the result, its JSON and the text say why replicated is missing."""
    from simulator.replay.render import render_replay

    path = random_trace(tmp_path / "s.h5", tokens=600)
    with open_trace(path) as tr:
        result = replay(tr, ReplayConfig(num_gpus=2, gpus_per_node=2, placements=("contiguous", "replicated"),
                                         redundant_experts=17))
    assert [p.label for p in result.placements] == ["contiguous"]
    assert [p for p, _ in result.skipped] == ["replicated"] and "17 redundant slots" in result.skipped[0][1]
    assert result.to_dict()["skipped"][0]["placement"] == "replicated"
    assert "Skipped replicated: 17 redundant slots" in render_replay(result)


def test_library_default_redundancy_is_the_command_line_rule(tmp_path) -> None:
    """ReplayConfig(redundant_experts=None) resolves as `moe-sim replay` does: one slot per GPU, rounded so
    the slots divide (16 experts on 6 GPUs: 6 -> 8, four slots each), and replay reports the value."""
    from simulator.placement import default_redundant_experts
    from traces.reader import open_trace

    path = random_trace(tmp_path / "t.h5", tokens=600, layers=2, experts=16, top_k=2)
    config = ReplayConfig(num_gpus=6, gpus_per_node=6, placements=("replicated",))
    resolved, note = config.resolved(16)
    assert resolved.redundancy == default_redundant_experts(16, 6).redundant_experts == 8
    assert note is not None and "rounded" in note
    with pytest.raises(ValueError, match="not resolved"):
        _ = config.redundancy
    with open_trace([path]) as tr:
        result = replay(tr, config)
    assert result.config["redundant_experts"] == 8
    assert ReplayConfig(num_gpus=6, gpus_per_node=6, redundant_experts=3).resolved(16)[1] is None
