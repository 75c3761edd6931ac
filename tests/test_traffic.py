"""Traffic-aware placement: the traffic kernel (home and stay dispatch models) against its NumPy twin, a
hand-worked token and the replay; the token-level search against a from-scratch reference; the cross-layer
fit finding the pairs a synthetic trace was built with; the trade-off curve."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from simulator.placement import Placement, fit_placement
from simulator.placement.routing import StepSampler, count_cross_layer
from simulator.placement.traffic import sampled_pairs, sampled_peaks, serving_gpus
from simulator.placement.traffic_search import EXACT_CANDIDATES, token_pairs, traffic_search_layer
from simulator.replay import ReplayConfig, fit_statistics, replay
from simulator.traffic.reference import reference_traffic
from simulator.traffic.score import score_arrays, score_traffic
from simulator.traffic.tradeoff import tradeoff_curve
from traces.reader import open_trace
from traces.synthetic import SynthConfig, build_model, write_synthetic


def random_routing(rng: np.random.Generator, tokens: int, layers: int, experts: int,
                   top_k: int) -> np.ndarray:
    return np.stack([np.stack([rng.choice(experts, top_k, replace=False) for _ in range(layers)])
                     for _ in range(tokens)]).astype(np.int64)  # [T, L, K]


@pytest.mark.parametrize("seed", range(4))
def test_traffic_kernel_matches_reference(seed):
    rng = np.random.default_rng(seed)
    experts, layers, top_k, gpus = 8, 3, 3, 4
    per_node = 2 if seed % 2 else 4
    redundant = 4 if seed >= 2 else 0
    ids = random_routing(rng, 90, layers, experts, top_k)
    steps = np.sort(rng.integers(0, 12, 90))
    phases = (rng.random(90) < 0.4).astype(np.uint8)
    load = rng.pareto(1.0, (layers, experts)) + 0.1
    placement = fit_placement("replicated" if redundant else "balanced", load, num_gpus=gpus,
                              gpus_per_node=per_node, redundant_experts=redundant)
    for stay in (False, True):
        for tps in (0, 7):
            totals = score_arrays([(0, ids[:40], steps[:40], phases[:40]), (40, ids[40:], steps[40:],
                                                                              phases[40:])],
                                  [placement], experts, stay=stay, tokens_per_step=tps)
            ref = reference_traffic(ids, steps, phases, placement, stay=stay, tokens_per_step=tps)
            np.testing.assert_array_equal(totals.pairs[0], ref["pairs"])
            assert totals.steps[0] == ref["steps"] and totals.tokens[0] == ref["tokens"]
            assert totals.peak_sum[0] / totals.mean_sum[0] == pytest.approx(ref["step_imbalance"])


def test_stay_model_by_hand():
    # 2 GPUs in one node, experts 0, 1 on GPU 0 and 2, 3 on GPU 1, both layers; one token (home GPU 0)
    slots = np.array([[[0, 1], [2, 3]]] * 2)
    placement = Placement("hand", slots, 4, 2)
    ids = np.array([[[2, 0], [3, 1]]])  # layer 0: top-1 expert 2 (GPU 1), then 0; layer 1: 3 (GPU 1), then 1
    steps, phases = np.zeros(1, dtype=np.int64), np.zeros(1, dtype=np.uint8)
    home = score_arrays([(0, ids, steps, phases)], [placement], 4, stay=False).pairs[0]
    # home: each layer sends to GPU 1 and gets its output back
    np.testing.assert_array_equal(home, [[1, 0, 1, 0], [1, 0, 1, 0]])
    stay = score_arrays([(0, ids, steps, phases)], [placement], 4, stay=True).pairs[0]
    # layer 0: dispatch 0 -> 1; combine on GPU 1 (top-1) from GPU 0 (expert 0's output and the residual)
    # layer 1: the token is on GPU 1: dispatch to GPU 0 (expert 1); combine home on GPU 0 from GPU 1
    np.testing.assert_array_equal(stay, [[1, 0, 1, 0], [1, 0, 1, 0]])
    # both layers' experts on GPU 1: the residual still moves there once, then layer 1 needs no dispatch
    ids = np.array([[[2, 3], [3, 2]]])
    stay = score_arrays([(0, ids, steps, phases)], [placement], 4, stay=True).pairs[0]
    np.testing.assert_array_equal(stay, [[1, 0, 1, 0], [0, 0, 1, 0]])


@pytest.fixture(scope="module")
def clustered_trace(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, SynthConfig]:
    config = SynthConfig(tokens=12000, seed=4, sequences=12, cluster_weight=0.6, stickiness=0.1)
    path = tmp_path_factory.mktemp("traffic") / "t.h5"
    write_synthetic(path, config)
    return path, config


def test_home_model_is_what_the_replay_charges(clustered_trace):
    path, _ = clustered_trace
    with open_trace(path) as trace:
        config = ReplayConfig(num_gpus=8, gpus_per_node=4, placements=("balanced", "replicated"),
                              redundant_experts=8, tokens_per_step=256)
        result = replay(trace, config)
        scores = score_traffic(trace, result.fitted_placements, [p.label for p in result.placements],
                               dispatch_model="home", score_start=result.score_start, tokens_per_step=256)
    for summary, score in zip(result.placements, scores, strict=True):
        assert score.tokens == summary.tokens and score.steps == summary.steps
        assert score.step_imbalance == pytest.approx(summary.step_imbalance, rel=1e-12)
        assert score.all_to_all_bytes_per_token * score.tokens == pytest.approx(
            summary.all_to_all_bytes_per_step * summary.steps, rel=1e-12)


def search_reference(slots, movable, per, tok_e, fixed, src, step, num_steps, gpn, node_weight, cap, step_cap,
                     max_swaps):
    """traffic_search_layer from scratch: each round every move gain, every swap estimate and the exact
    pairs and step peaks recomputed whole."""
    out = slots.copy()
    g_count, s_count = out.shape
    n_tok = tok_e.shape[0]

    def where() -> np.ndarray:
        loc = np.zeros(per.size, dtype=np.int64)
        for g in range(g_count):
            for e in out[g][out[g] >= 0]:
                loc[e] = g
        return loc

    def state(loc):
        gpu = np.where(fixed >= 0, fixed, loc[tok_e])
        return token_pairs(tok_e, fixed, src, loc, g_count, gpn, node_weight), sampled_peaks(
            gpu, step, num_steps, g_count)

    for _ in range(max_swaps):
        loc = where()
        pairs, peak = state(loc)
        gain = np.zeros((per.size, g_count))
        for e in np.flatnonzero(movable):
            for g2 in range(g_count):
                if g2 != loc[e]:
                    moved = loc.copy()
                    moved[e] = g2
                    gain[e, g2] = state(moved)[0] - pairs
        gpu_load = np.array([per[r[r >= 0]].sum() for r in out])
        cands: list[tuple[float, int, int, int, int, int]] = []
        for g1 in range(g_count):
            for s1 in range(s_count):
                for g2 in range(g1 + 1, g_count):
                    for s2 in range(s_count):
                        e1, e2 = out[g1, s1], out[g2, s2]
                        if e1 < 0 or e2 < 0 or not movable[e1] or not movable[e2]:
                            continue
                        est = gain[e1, g2] + gain[e2, g1]
                        if est >= 0 or max(gpu_load[g1] - per[e1] + per[e2],
                                           gpu_load[g2] - per[e2] + per[e1]) > cap:
                            continue
                        cands.append((est, len(cands), g1, s1, g2, s2))
        cands.sort()
        best, move = -1e-9, None
        for _est, _i, g1, s1, g2, s2 in cands[:EXACT_CANDIDATES]:
            swapped = loc.copy()
            swapped[out[g1, s1]], swapped[out[g2, s2]] = g2, g1
            new_pairs, new_peak = state(swapped)
            if new_pairs - pairs < best and new_peak <= step_cap:
                best, move = new_pairs - pairs, (g1, s1, g2, s2)
        if move is None:
            break
        g1, s1, g2, s2 = move
        out[g1, s1], out[g2, s2] = out[g2, s2], out[g1, s1]
    assert n_tok == tok_e.shape[0]
    return out


@pytest.mark.parametrize("seed", range(4))
def test_search_kernel_matches_reference(seed):
    rng = np.random.default_rng(seed)
    experts, gpus, top_k, tokens = 8, 4, 3, 60
    per_node = 2 if seed % 2 else 4
    redundant = 4 if seed >= 2 else 0
    load = rng.pareto(1.0, (1, experts)) + 1.0
    slots = fit_placement("replicated" if redundant else "balanced", load, num_gpus=gpus,
                          gpus_per_node=per_node, redundant_experts=redundant).slots[0].astype(np.int64)
    counts = np.bincount(slots[slots >= 0], minlength=experts)
    per = load[0] / counts
    # tokens of two "topics" choose experts {0..3} or {4..7} mostly, so co-locating pays
    tok_e = np.stack([rng.choice(np.arange(4) + 4 * (t % 2) if rng.random() < 0.7 else np.arange(experts),
                                 top_k, replace=False) for t in range(tokens)])
    token = np.arange(tokens, dtype=np.int64)
    src = token % gpus
    step = token // 10
    fixed = np.where(counts[tok_e] > 1, serving_gpus(slots, tok_e, src, token), -1)
    base_peak = sampled_peaks(np.where(fixed >= 0, fixed, _locations(slots, experts)[tok_e]), step, 6, gpus)
    cap = load.sum() / gpus * 1.5
    args = (slots, counts == 1, per, tok_e, fixed, src, step, 6, per_node, 4.0, cap, base_peak * 1.2, 40)
    fast = traffic_search_layer(*args)
    slow = search_reference(*args)
    np.testing.assert_array_equal(fast, slow)
    assert not np.array_equal(fast, slots)  # a swap was worth making


def _locations(slots: np.ndarray, experts: int) -> np.ndarray:
    loc = np.zeros(experts, dtype=np.int64)
    for g in range(slots.shape[0]):
        loc[slots[g][slots[g] >= 0]] = g
    return loc


def test_count_cross_layer_and_step_sampler():
    rng = np.random.default_rng(0)
    ids = random_routing(rng, 50, 3, 6, 2)
    keep = rng.random(50) < 0.7
    out = np.zeros((2, 6, 6), dtype=np.int64)
    count_cross_layer(ids, keep, out)
    ref = np.zeros_like(out)
    for t in np.flatnonzero(keep):
        for layer in range(2):
            for b in ids[t, layer + 1]:
                ref[layer, ids[t, layer, 0], b] += 1
    np.testing.assert_array_equal(out, ref)
    sampler = StepSampler(budget=100)
    step_sizes = rng.integers(1, 20, 60)
    keys = np.repeat(np.arange(60), step_sizes)
    ids = random_routing(rng, keys.size, 2, 6, 2)
    for a in range(0, keys.size, 37):  # fed in chunks that cut steps
        sampler.add(ids[a:a + 37], np.arange(a, min(a + 37, keys.size)), keys[a:a + 37])
    sample = sampler.sample(np.zeros((1, 6, 6), dtype=np.int64), 2, 2)
    assert sample.ids.shape[0] <= 200 and sample.num_steps >= 4
    kept_keys = keys[sample.token]
    for k in np.unique(kept_keys):  # whole steps only
        assert (kept_keys == k).sum() == step_sizes[k]
    np.testing.assert_array_equal(sample.ids, ids[sample.token])


def test_affinity_fit_finds_the_cross_layer_pairs(clustered_trace):
    path, config = clustered_trace
    model = build_model(config)  # the synthetic trace's own clusters: a sequence's topic is shared by layers
    cluster_of = model.clusters.cluster_of  # [L, E]
    with open_trace(path) as trace:
        stats = fit_statistics(trace, fit_fraction=0.0, phase="all", tokens_per_step=0, with_coselection=True)
    assert stats.routing is not None
    cross = stats.routing.cross_layer.astype(np.float64)  # [L - 1, E, E]
    # lift of each (a at l, b at l + 1) over independent choice: the pair's topics must match
    expected = cross.sum(axis=2, keepdims=True) * cross.sum(axis=1, keepdims=True) / cross.sum(
        axis=(1, 2), keepdims=True)
    lift = cross / np.maximum(expected, 1e-9)
    hits = [cluster_of[layer, a] == cluster_of[layer + 1, int(np.argmax(lift[layer, a]))]
            for layer in range(cross.shape[0]) for a in range(cross.shape[1]) if cross[layer, a].sum() > 200]
    assert len(hits) > 200 and np.mean(hits) > 0.9
    # the fitted placement keeps a token's next expert on the GPU of its top-1 expert far more than balanced
    kept = {}
    for policy in ("balanced", "affinity"):
        slots = fit_placement(policy, stats.load, num_gpus=8, gpus_per_node=8, coselection=stats.coselection,
                              routing=stats.routing, step_budget=0.2).slots
        loc = np.array([_locations(slots[layer].astype(np.int64), 64) for layer in range(slots.shape[0])])
        same = loc[:-1, :, None] == loc[1:, None, :]  # [L - 1, a, b] on one GPU
        kept[policy] = float((cross * same).sum() / cross.sum())
    assert kept["affinity"] > 1.5 * kept["balanced"]
    with open_trace(path) as trace:
        stats = fit_statistics(trace, fit_fraction=0.25, phase="all", tokens_per_step=0,
                               with_coselection=True)
    assert stats.routing is not None
    pairs = {}
    for policy in ("balanced", "coactivation", "affinity"):
        placement = fit_placement(policy, stats.load, num_gpus=8, gpus_per_node=8,
                                  coselection=stats.coselection, routing=stats.routing, step_budget=0.05)
        pairs[policy] = sampled_pairs(placement.slots, stats.routing, gpus_per_node=8, node_weight=4.0,
                                      stay=True)
    assert pairs["affinity"] < pairs["coactivation"] < pairs["balanced"]


def test_tradeoff_curve(clustered_trace):
    path, _ = clustered_trace
    with open_trace(path) as trace:
        curve = tradeoff_curve(trace, num_gpus=8, gpus_per_node=8, redundant_experts=0,
                               policies=("balanced", "coactivation", "affinity"), budgets=(0.0, 0.2))
    ref = next(p for p in curve.points if p.policy == "balanced" and p.score.dispatch_model == "home")
    assert ref.bytes_change == 0 and ref.imbalance_change == 0
    assert {p.score.dispatch_model for p in curve.points} == {"home", "stay"}
    loose = [p for p in curve.points if p.budget == 0.2]
    assert all(p.bytes_change < -0.05 for p in loose)  # a loose budget buys fewer bytes...
    assert all(p.imbalance_change > 0 for p in loose)  # ...with more step imbalance
    best = curve.best_within(0.0)
    assert best is not None and best.imbalance_change <= 0
