"""Per-step replica dispatch policies (--dispatch): hand-worked steps, the order lp <= least-loaded <= static
on random steps, the Numba kernels against their NumPy twins, exact merging, and the CLI."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from click.testing import CliRunner
from sim_fixtures import fitted_variants, random_trace, tiny_meta, write_ids

from simulator import dispatch_kernels as DK
from simulator import kernels as K
from simulator import metrics
from simulator.commands import plan as plan_cli
from simulator.commands import replay as replay_cli
from simulator.cost_model import cost_matrix, model_vector
from simulator.hardware import GpuSpec
from simulator.placement import Placement, fit_placement
from simulator.replay import ReplayConfig, Segment, Variant, VariantArrays, run_variants
from simulator.replay.dispatch import DispatchSegment
from simulator.replay_reference import lp_optimum, reference_replay, reference_split
from simulator.report.commands import report as report_cli
from traces import open_trace
from traces.errors import InputError

POLICY = {name: DK.DISPATCH_POLICIES.index(name) for name in DK.DISPATCH_POLICIES}


def split(policy: str, static: list[list[int]], gpus: list[list[int]], num_gpus: int) -> list[list[int]]:
    """dispatch_kernels.split_layer on one layer given as lists: static[e][j] tokens of expert e on its
    replica j, on GPU gpus[e][j]."""
    r_max = max(len(g) for g in gpus)
    cnt = np.zeros((len(gpus), r_max), dtype=np.int64)
    rep_gpu = np.zeros((len(gpus), r_max), dtype=np.int64)
    for e, (c, g) in enumerate(zip(static, gpus, strict=True)):
        cnt[e, : len(c)] = c
        rep_gpu[e, : len(g)] = g
    n_rep = np.array([len(g) for g in gpus], dtype=np.int64)
    DK.split_layer(POLICY[policy], cnt, n_rep, rep_gpu, np.zeros(num_gpus, dtype=np.int64), len(gpus))
    return [cnt[e, : len(g)].tolist() for e, g in enumerate(gpus)]


def gpu_loads(parts: list[list[int]], gpus: list[list[int]], num_gpus: int) -> list[int]:
    load = [0] * num_gpus
    for c, g in zip(parts, gpus, strict=True):
        for n, gpu in zip(c, g, strict=True):
            load[gpu] += n
    return load


def test_hand_worked_step_every_policy():
    """Three GPUs. Expert A (12 tokens) on GPUs 0 and 1, expert B (6) on GPUs 1 and 2, expert D (6) only on
    GPU 2; the static rule happened to put all of A and B on GPU 1: loads 0, 18, 6.
    round-robin: A 6/6, B 3/3 -> 6, 9, 9.
    least-loaded: A first (hottest), with B still on GPU 1: levels 0 and 6, 12 tokens -> 9 and 9; then B over
    GPU 1 (at 3 without it) and GPU 2 (6): level 7 takes 4 + 1, the one left to the first -> B 5/1 -> 9, 8, 7.
    lp: the mean is 8 and it is reachable: A 8/4, B 4/2 -> 8, 8, 8 (least-loaded's greedy order misses it).
    """
    gpus = [[0, 1], [1, 2], [2]]
    static = [[0, 12], [6, 0], [6]]
    expected = {"static": ([[0, 12], [6, 0], [6]], [0, 18, 6]),
                "round-robin": ([[6, 6], [3, 3], [6]], [6, 9, 9]),
                "least-loaded": ([[9, 3], [5, 1], [6]], [9, 8, 7]),
                "lp": (None, [8, 8, 8])}
    for policy, (parts, loads) in expected.items():
        got = split(policy, static, gpus, 3)
        if parts is not None:
            assert got == parts, policy
        assert gpu_loads(got, gpus, 3) == loads, policy
        assert [sum(c) for c in got] == [12, 6, 6]
    # round-robin gives the first d mod r replicas one more: 7 tokens over 3 replicas -> 3, 2, 2
    assert split("round-robin", [[7, 0, 0]], [[0, 1, 2]], 3) == [[3, 2, 2]]


def test_least_loaded_waterfill_ties_go_to_the_first_replica():
    """Equal levels: the extra tokens go to the lower replicas first, as handing tokens out one by one to
    the least-loaded replica does; a GPU already above the level gets none."""
    # expert 0 over GPUs 0, 1, 2 with GPU 2 holding 9 tokens of expert 1: 7 tokens -> levels 4, 3 (0 on 2)
    assert split("least-loaded", [[7, 0, 0], [9]], [[0, 1, 2], [2]], 3) == [[4, 3, 0], [9]]
    assert split("least-loaded", [[0, 0, 5], [9]], [[0, 1, 2], [2]], 3) == [[3, 2, 0], [9]]


def test_route_step_hand_worked():
    """Two GPUs, one layer, top-1. Expert 0 has replicas on both GPUs, expert 1 only on GPU 1. Tokens t0..t5
    start on GPUs 0,1,0,1,0,1; t1, t3 choose expert 0 (local on GPU 1), the others expert 1 (GPU 1).
    static: all six on GPU 1 (loads 0, 6), three leave (t0, t2, t4).
    least-loaded and lp: expert 0's two tokens go to GPU 0 (loads 2, 4); t1 and t3 leave as well: five.
    round-robin: expert 0 one each (loads 1, 5); t1 stays local (GPU 1's share), t3 leaves: four."""
    placement = Placement(slots=np.array([[[0, -1], [0, 1]]]), num_experts=2, gpus_per_node=2, policy="hand")
    arrays = VariantArrays.build([Variant("hand", placement, 0, 0)], 2)
    ids = np.array([1, 0, 1, 0, 1, 1], dtype=np.uint8).reshape(6, 1, 1)
    tok = np.arange(6, dtype=np.int64)
    expected = {"static": ([0, 6], 3), "least-loaded": ([2, 4], 5), "lp": ([2, 4], 5),
                "round-robin": ([1, 5], 4)}
    for policy, (loads, leave) in expected.items():
        acc = np.zeros((1, arrays.width), dtype=np.int64)
        tot = np.zeros((1, K.NUM_INT_TOTALS), dtype=np.int64)
        DK.route_step(POLICY[policy], tok, ids, 2, 2, 2, arrays.rep_count[0], arrays.rep_slot[0],
                      arrays.local_slot[0], arrays.slot_gpu[0], acc, tot)
        per_gpu = acc[0, :4].reshape(2, 2).sum(axis=1)
        assert per_gpu.tolist() == loads, policy
        assert tot[0, K.I_LEAVE_GPU] == leave, policy
        assert tot[0, K.I_SU_PAIRS] == leave  # top-1 in one node: one pair per token that leaves
        assert acc[0, 4:6].sum() == acc[0, 6:8].sum() == leave  # sends and receives per GPU


def test_route_and_price_reports_balancedness_hand_worked():
    """The step of test_route_step_hand_worked, priced: a mean of 3 assignments per GPU, the busiest GPU at 6
    (static), 5 (round-robin) or 4 (least-loaded, lp). Step imbalance busiest / 3; SGLang's one-layer ratio
    (3 + 1e-5) / (busiest + 1e-5); vLLM's 1 / the imbalance."""
    placement = Placement(slots=np.array([[[0, -1], [0, 1]]]), num_experts=2, gpus_per_node=2, policy="hand")
    arrays = VariantArrays.build([Variant("hand", placement, 0, 0)], 2)
    ids = np.array([1, 0, 1, 0, 1, 1], dtype=np.uint8).reshape(6, 1, 1)
    tok = np.arange(6, dtype=np.int64)
    meta = tiny_meta(1, 2, 1)
    model, cost = model_vector(meta, None), cost_matrix([GpuSpec.from_name("h100")])
    eps = metrics.SGLANG_EPSILON
    for policy, busiest in {"static": 6, "round-robin": 5, "least-loaded": 4, "lp": 4}.items():
        tot_int = np.zeros((1, 1, K.NUM_INT_TOTALS), dtype=np.int64)
        tot_gpu = np.zeros((1, 1, arrays.g_max), dtype=np.int64)
        comp = np.zeros((1, 1, 1, len(K.COMPONENTS)))
        imb, sglang = DK.route_and_price(POLICY[policy], tok, ids, 0, arrays.gpus, arrays.slots, arrays.gpn,
                                         arrays.used, arrays.rep_count, arrays.rep_slot, arrays.local_slot,
                                         arrays.slot_gpu, model, cost, arrays.width, tot_int, tot_gpu, comp,
                                         np.zeros(1))
        assert imb == pytest.approx(busiest / 3, rel=1e-12), policy
        assert sglang == pytest.approx((3 + eps) / (busiest + eps), rel=1e-12), policy
        assert metrics.vllm_step_balancedness(np.array([imb]))[0] == pytest.approx(3 / busiest), policy


def random_layer(rng: np.random.Generator) -> tuple[list[list[int]], list[list[int]], int]:
    """A random step of one layer: G GPUs, experts with 1 to 3 replicas on distinct GPUs, Zipf-like loads
    put on the replicas at random (as some static rule might)."""
    g = int(rng.integers(2, 9))
    e_count = int(rng.integers(2, 20))
    gpus, static = [], []
    for e in range(e_count):
        r = int(rng.integers(1, min(3, g) + 1)) if rng.random() < 0.5 else 1
        gs = sorted(rng.choice(g, size=r, replace=False).tolist())
        d = int(rng.poisson(60.0 / (e + 1) ** 0.8 * rng.uniform(0.5, 2.0)))
        gpus.append(gs)
        static.append(rng.multinomial(d, rng.dirichlet(np.ones(r))).tolist())
    return static, gpus, g


def test_lp_never_worse_than_least_loaded_never_worse_than_static():
    """Property over random steps: busiest GPU of lp <= least-loaded <= static; lp's is the LP optimum
    rounded up (linprog, HiGHS); every policy keeps each expert's tokens and its twin agrees."""
    rng = np.random.default_rng(13)
    strict_ll, strict_lp = 0, 0
    for _ in range(300):
        static, gpus, g = random_layer(rng)
        worst = {p: max(gpu_loads(split(p, static, gpus, g), gpus, g)) for p in DK.DISPATCH_POLICIES}
        assert worst["lp"] <= worst["least-loaded"] <= worst["static"]
        strict_ll += worst["least-loaded"] < worst["static"]
        strict_lp += worst["lp"] < worst["least-loaded"]
        arrays = [np.array(c, dtype=np.int64) for c in static]
        gpu_arrays = [np.array(x, dtype=np.int64) for x in gpus]
        z_star = lp_optimum(arrays, gpu_arrays, g)
        assert worst["lp"] == math.ceil(z_star - 1e-7)
        for p in DK.DISPATCH_POLICIES:
            got = split(p, static, gpus, g)
            assert [sum(c) for c in got] == [sum(c) for c in static]
            assert all(n >= 0 for c in got for n in c)
            twin = [c.tolist() for c in reference_split(p, arrays, gpu_arrays, g)]
            if p == "lp":  # LP splits are not unique; their busiest GPU is
                assert max(gpu_loads(twin, gpus, g)) == worst["lp"]
            else:
                assert got == twin, p
    assert strict_ll > 50 and strict_lp > 5  # the property is not vacuous


def _columns(tr) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    data = tr.read_all(["expert_ids", "step", "phase"])
    assert data.expert_ids is not None and data.step is not None and data.phase is not None
    return data.expert_ids, data.step, data.phase


def _variants(path, tps):
    with open_trace(path) as tr:
        return fitted_variants(tr.metadata, (("replicated", 4, 2, 4), ("replicated", 4, 4, 12),
                                             ("balanced", 4, 2, 0)), tps)


@pytest.mark.parametrize("dispatch,tps,score_start,tokens", [
    ("round-robin", 40, 100, 1500), ("least-loaded", 0, 0, 1500), ("least-loaded", 33, 250, 1500),
    ("lp", 40, 0, 500)])  # lp's twin solves two linear programs per step and layer
def test_dispatch_kernels_match_numpy_reference(tmp_path, dispatch, tps, score_start, tokens):
    path = random_trace(tmp_path / "r.h5", tokens=tokens, seed=tps + 3)
    variants = _variants(path, tps)
    gpu = GpuSpec.from_name("h100")
    with open_trace(path) as tr:
        seg = run_variants(tr, variants, [gpu], phase="all", score_start=score_start, capacity_factor=None,
                           chunk_tokens=97, dispatch=dispatch)
        ids, steps, phases = _columns(tr)
        meta = tr.metadata
    model, cost = model_vector(meta, None), cost_matrix([gpu])
    exact = dispatch != "lp"  # lp's split is not unique: only what it optimises must agree
    for i, v in enumerate(variants):
        ref = reference_replay(ids, steps, phases, v.placement, model=model,
                               cost_row=cost[0], score_start=score_start, tokens_per_step=tps,
                               dispatch=dispatch)
        ti = seg.tot_int[i]
        imb, tim, ntok = seg.series(i)
        assert np.array_equal(ti[:, K.I_PEAK], ref.peak)
        assert np.array_equal(ntok, ref.step_ntok)
        np.testing.assert_allclose(imb, ref.step_imbalance, rtol=1e-12)
        # each layer's busiest GPU is the policy's optimum even for lp, so SGLang's ratio is exact for all
        np.testing.assert_allclose(seg.sglang_layer_sums(i), ref.step_sglang_sum, rtol=1e-12)
        assert seg.tot_gpu[i].sum(axis=1).tolist() == ref.tot_gpu.sum(axis=1).tolist()
        if exact:
            assert np.array_equal(seg.tot_gpu[i, :, : v.placement.num_gpus], ref.tot_gpu)
            for col, name in ((K.I_LEAVE_GPU, "leave_gpu"), (K.I_LEAVE_NODE, "leave_node"),
                              (K.I_SU_PAIRS, "su_pairs"), (K.I_SO_PAIRS, "so_pairs"), (K.I_ACTIVE, "active")):
                assert np.array_equal(ti[:, col], getattr(ref, name)), name
            np.testing.assert_allclose(tim[0], ref.step_time, rtol=1e-9)


def test_buffered_static_matches_the_token_kernel(tmp_path):
    """The per-step path routes `static` exactly as kernels.replay_chunk does token by token."""
    path = random_trace(tmp_path / "s.h5", tokens=1200, seed=5, step_len=30)
    variants = _variants(path, 0) + _variants(path, 50)
    gpu = GpuSpec.from_name("h200")
    with open_trace(path) as tr:
        ids, steps, phases = _columns(tr)
        meta = tr.metadata
    arrays = VariantArrays.build(variants, meta.num_experts)
    model, cost = model_vector(meta, 1.5), cost_matrix([gpu])
    token = Segment.empty(arrays, model, cost, meta.num_moe_layers)
    buffered = DispatchSegment.empty(arrays, model, cost, meta.num_moe_layers).start(DK.P_STATIC)
    for seg in (token, buffered):
        for lo in range(0, 1200, 211):
            seg.feed(ids[lo: lo + 211], steps[lo: lo + 211], phases[lo: lo + 211], lo, -1, 0)
        seg.finish()
    assert np.array_equal(token.tot_gpu, buffered.tot_gpu)
    assert np.array_equal(token.tot_int, buffered.tot_int)
    np.testing.assert_allclose(token.comp, buffered.comp, rtol=1e-12)
    for i in range(len(variants)):
        for x, y in zip(token.series(i), buffered.series(i), strict=True):
            np.testing.assert_allclose(x, y, rtol=1e-12)
        np.testing.assert_allclose(token.sglang_layer_sums(i), buffered.sglang_layer_sums(i), rtol=1e-12)


def test_dispatch_segments_merge_exactly(tmp_path):
    """Two segments cut inside a recorded step, replayed apart and absorbed, give the one-pass result (the
    straddling step is routed once, on all its tokens), whatever the chunk size."""
    path = random_trace(tmp_path / "m.h5", tokens=1800, seed=7, step_len=40)
    variants = _variants(path, 0)
    gpu = GpuSpec.from_name("h200")
    with open_trace(path) as tr:
        whole = run_variants(tr, variants, [gpu], phase="all", score_start=0, capacity_factor=None,
                             chunk_tokens=5000, dispatch="least-loaded")
        small = run_variants(tr, variants, [gpu], phase="all", score_start=0, capacity_factor=None,
                             chunk_tokens=13, dispatch="least-loaded")
        ids, steps, phases = _columns(tr)
        meta = tr.metadata
    assert steps[900] == steps[899]
    arrays = VariantArrays.build(variants, meta.num_experts)
    model, cost = model_vector(meta, None), cost_matrix([gpu])
    parts = []
    for lo, hi in ((0, 900), (900, 1800)):
        seg = DispatchSegment.empty(arrays, model, cost, meta.num_moe_layers).start(DK.P_LEAST_LOADED)
        seg.feed(ids[lo:hi], steps[lo:hi], phases[lo:hi], lo, -1, 0)
        parts.append(seg)
    parts[0].absorb(parts[1])
    parts[0].finish()
    for other in (small, parts[0]):
        assert np.array_equal(other.tot_gpu, whole.tot_gpu)
        assert np.array_equal(other.tot_int, whole.tot_int)
        for i in range(len(variants)):
            for x, y in zip(other.series(i), whole.series(i), strict=True):
                np.testing.assert_allclose(x, y, rtol=1e-12)
            np.testing.assert_allclose(other.sglang_layer_sums(i), whole.sglang_layer_sums(i), rtol=1e-12)


def test_long_recorded_step_grows_the_buffer(tmp_path):
    """A recorded step longer than the first room (and than a kernel call's piece) is still one step."""
    rng = np.random.default_rng(2)
    meta = tiny_meta(2, 8, 2)
    ids = np.stack([np.stack([rng.permutation(8)[:2] for _ in range(2)]) for _ in range(5000)])
    steps = np.repeat([0, 1], [4500, 500])
    path = write_ids(tmp_path / "long.h5", meta, ids, steps, np.zeros(5000, dtype=np.uint8))
    load = np.ones((2, 8))
    p = fit_placement("replicated", load, num_gpus=2, gpus_per_node=2, redundant_experts=2)
    with open_trace(path) as tr:
        seg = run_variants(tr, [Variant("r", p, 0, 2)], [GpuSpec.from_name("h100")], phase="all",
                           score_start=0, capacity_factor=None, chunk_tokens=1000, dispatch="lp")
    assert seg.series(0)[2].tolist() == [4500, 500]
    assert seg.tot_gpu[0].sum() == 5000 * 2 * 2


def test_replay_cli_names_the_dispatch_policy(tmp_path):
    path = random_trace(tmp_path / "c.h5", tokens=1500, layers=2, experts=16, top_k=2)
    runner = CliRunner()
    common = [str(path), "--gpus", "4", "--gpus-per-node", "2", "--placements", "balanced,replicated",
              "--redundant-experts", "4", "--tokens-per-step", "64", "--quiet"]
    out = {}
    for policy in ("static", "lp"):
        res = runner.invoke(replay_cli, [*common, "--dispatch", policy, "--json"])
        assert res.exit_code == 0, res.output
        out[policy] = json.loads(res.stdout)
        assert out[policy]["config"]["dispatch"] == policy
    imb = {p: {s["label"]: s["step_imbalance"] for s in out[p]["placements"]} for p in out}
    assert imb["lp"]["replicated+4"] < imb["static"]["replicated+4"]
    assert imb["lp"]["balanced"] == imb["static"]["balanced"]  # no replicas: nothing to split
    # lp lowers every layer's busiest GPU: both engines' balancedness rise with it, and only where it splits
    for engine in ("sglang_balancedness", "vllm_balancedness"):
        got = {p: {s["label"]: s[engine] for s in out[p]["placements"]} for p in out}
        assert got["lp"]["replicated+4"] > got["static"]["replicated+4"], engine
        assert got["lp"]["balanced"] == got["static"]["balanced"], engine
    table = runner.invoke(replay_cli, [*common, "--dispatch", "least-loaded"])
    assert table.exit_code == 0, table.output
    assert "dispatch least-loaded" in " ".join(table.output.split())
    bad = runner.invoke(replay_cli, [*common, "--dispatch", "random"])
    assert bad.exit_code == 2 and "--dispatch" in bad.output
    with pytest.raises(InputError, match="--dispatch must be one of"):
        ReplayConfig(dispatch="random")


def test_plan_takes_dispatch(tmp_path):
    path = random_trace(tmp_path / "p.h5", tokens=3000, layers=2, experts=16, top_k=2, skew=1.5)
    args = [str(path), "--target-tokens-per-s", "1", "--gpus", "4", "--gpus-per-node", "4", "--placements",
            "replicated", "--redundant-experts", "4", "--tokens-per-step", "128", "--json", "--quiet"]
    out = {}
    for policy in ("static", "least-loaded"):
        res = CliRunner().invoke(plan_cli, [*args, "--dispatch", policy])
        assert res.exit_code == 0, res.output
        out[policy] = json.loads(res.stdout)
        assert out[policy]["config"]["dispatch"] == policy
    imb = {p: out[p]["candidates"][0]["step_imbalance"] for p in out}
    assert imb["least-loaded"] < imb["static"]


def test_report_carries_dispatch_to_plan_and_replay(tmp_path):
    from simulator.report import build_report
    from simulator.report.collect import ReportOptions, collect_inputs
    from traces.synthetic import SynthConfig, write_synthetic

    path = write_synthetic(tmp_path / "s.h5", SynthConfig(tokens=4000, seed=3, batch_size=4), force=True)
    options = ReportOptions(hardware=[GpuSpec.from_name("h100")], gpus=[8], target_tokens_per_s=1000.0,
                            redundant_experts=[8], rebalance_every=(5,), window=10, segments=2,
                            plan_tokens_per_gpu=[16], dispatch="lp")
    with open_trace(path) as tr:
        inputs = collect_inputs(tr, options)
    assert inputs.plan is not None and inputs.plan.config["dispatch"] == "lp"
    assert inputs.replay.config["dispatch"] == "lp"
    layouts = build_report(inputs).section("layouts").paragraphs
    assert any("by the lp dispatch policy" in text for text in layouts)
    assert "--dispatch" in [opt for p in report_cli.params for opt in p.opts]
