"""Placement policies: invariants, balance against a plain greedy reference on real OLMoE counts, bad
input."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from simulator.hardware import ClusterLayout, GpuSpec, load_hardware
from simulator.placement import (
    POLICIES,
    TRAFFIC_AWARE,
    USES_REDUNDANCY,
    Placement,
    PlacementNotApplicable,
    Redundancy,
    check_slots,
    default_redundant_experts,
    expected_gpu_load,
    fit_placement,
    imbalance,
    load_placement_file,
    pack_items,
    replica_counts_minmax,
)
from simulator.placement.routing import RoutingSample
from traces.errors import InputError

COUNTS = Path(__file__).resolve().parents[1] / "data" / "olmoe_expert_counts.json"


def routing_sample(rng: np.random.Generator, layers: int, experts: int, tokens: int = 120) -> RoutingSample:
    """Random sampled steps (4 experts per token, 10 tokens per step) and their cross-layer counts."""
    top_k = min(4, experts)
    ids = np.stack([np.stack([rng.choice(experts, top_k, replace=False) for _ in range(layers)])
                    for _ in range(tokens)])
    cross = np.zeros((max(layers - 1, 0), experts, experts), dtype=np.int64)
    for layer in range(layers - 1):
        np.add.at(cross[layer], (np.repeat(ids[:, layer, 0], top_k), ids[:, layer + 1].ravel()), 1)
    token = np.arange(tokens, dtype=np.int64)
    return RoutingSample(ids, token, token // 10, cross)


def traffic_inputs(policy: str, rng: np.random.Generator, layers: int, experts: int) -> dict:
    """The routing sample a traffic-aware policy fits on (nothing for the others)."""
    return {"routing": routing_sample(rng, layers, experts)} if policy in TRAFFIC_AWARE else {}


def olmoe_counts(domain: str) -> np.ndarray:
    return np.array(json.loads(COUNTS.read_text())["domains"][domain], dtype=np.float64)  # [3, 64]


def greedy_reference(load: np.ndarray, num_gpus: int, redundant: int) -> float:
    """EPLB-style greedy in plain Python: replicas to the largest load per replica, heaviest into lightest
    GPU."""
    out = []
    for w in load:
        cnt = [1] * len(w)
        for _ in range(redundant):
            e = max(range(len(w)), key=lambda i: w[i] / cnt[i])
            cnt[e] += 1
        items = sorted(((w[e] / cnt[e], e) for e in range(len(w)) for _ in range(cnt[e])), reverse=True)
        per_gpu = (len(w) + redundant) // num_gpus
        tot, n = [0.0] * num_gpus, [0] * num_gpus
        for x, _e in items:
            g = min((g for g in range(num_gpus) if n[g] < per_gpu), key=lambda g: tot[g])
            tot[g] += x
            n[g] += 1
        out.append(max(tot) / (sum(tot) / num_gpus))
    return float(np.mean(out))


@pytest.mark.parametrize("policy", sorted(POLICIES))
def test_invariants(policy):
    rng = np.random.default_rng(1)
    load = rng.pareto(1.5, size=(3, 32)) + 0.1
    cosel = rng.integers(0, 50, size=(3, 32, 32))
    r = 8 if policy in USES_REDUNDANCY else 0
    p = fit_placement(policy, load, num_gpus=8, gpus_per_node=4, redundant_experts=r, coselection=cosel,
                      **traffic_inputs(policy, rng, 3, 32))
    assert p.slots.shape == (3, 8, (32 + r) // 8)
    counts = p.replica_counts
    assert (counts >= 1).all() and (counts.sum(axis=1) == 32 + r).all()
    for layer in range(3):
        for g in range(8):
            row = p.slots[layer, g]
            assert len(set(row.tolist())) == row.size  # no expert twice on a GPU
    gpu = expected_gpu_load(p, load)
    np.testing.assert_allclose(gpu.sum(axis=1), load.sum(axis=1))


def test_replicated_sparse_load_regression():
    # Reported: "GPU 5 holds the same expert twice" with load on 9 of 64 experts and 16 spare slots.
    load = np.zeros((1, 64))
    for e, v in {11: 16, 18: 7, 26: 8, 30: 11, 37: 8, 42: 6, 51: 9, 52: 5, 56: 19}.items():
        load[0, e] = v
    for policy in ("replicated", "replicated-hier", "coactivation"):
        p = fit_placement(policy, load, num_gpus=8, gpus_per_node=4, redundant_experts=16,
                          coselection=np.zeros((1, 64, 64)))
        assert (p.replica_counts.sum(axis=1) == 80).all()
        for g in range(8):  # the reported failure itself: no GPU holds one expert twice
            held = p.slots[0, g][p.slots[0, g] >= 0]
            assert np.unique(held).size == held.size, (policy, g, held)


def test_packing_exchanges_when_greedy_reaches_an_impasse():
    # Greedy alone puts experts 0 and 1 in bin 0 (ties go to the first bin) and expert 2 in bin 1; its second
    # replica then finds room only in bin 1, which already holds it. An exchange with bin 0 must make room.
    bins = pack_items(np.zeros(4), np.array([0, 1, 2, 2]), 2, 2, 100, 1)
    experts = np.array([0, 1, 2, 2])[bins]
    assert sorted(experts.ravel().tolist()) == [0, 1, 2, 2]
    assert all(len(set(row)) == 2 for row in experts.tolist())
    # At node level a bin may take an expert up to max_per_bin times, never more.
    item_expert = np.array([0, 0, 0, 0, 1, 1, 2, 3])
    bins = pack_items(np.array([0, 0, 0, 0, 5.0, 5.0, 9.0, 1.0]), item_expert, 2, 4, 100, 2)
    for row in item_expert[bins].tolist():
        assert max(row.count(e) for e in set(row)) <= 2


def _random_load(rng: np.random.Generator, layers: int, experts: int, kind: str) -> np.ndarray:
    if kind == "zero":
        return np.zeros((layers, experts))
    if kind == "sparse":  # most experts never chosen, a few hot ones
        load = np.zeros((layers, experts))
        for layer in range(layers):
            hot = rng.choice(experts, size=int(rng.integers(1, max(2, experts // 4))), replace=False)
            load[layer, hot] = rng.integers(1, 30, size=hot.size)
        return load
    if kind == "one-hot":
        load = np.zeros((layers, experts))
        load[:, int(rng.integers(experts))] = 100.0
        return load
    return np.floor(rng.pareto(1.0, size=(layers, experts)) * 10)  # skewed with ties and zeros


@pytest.mark.parametrize("seed", range(6))
def test_no_policy_puts_an_expert_twice_on_a_gpu(seed):
    """Property: every policy gives a valid placement (each expert held, no GPU holding one twice) on random
    sparse, skewed, one-hot and all-zero loads, for many layers and layouts. The refits of
    simulator/rebalance.py call the POLICIES functions directly, so the raw slots are checked too, not only
    fit_placement's validated result."""
    rng = np.random.default_rng(seed)
    for kind in ("zero", "sparse", "one-hot", "skewed"):
        for gpus, per_node, experts, redundant in ((2, 2, 8, 2), (4, 2, 16, 8), (8, 4, 64, 16),
                                                   (8, 8, 32, 24), (16, 4, 64, 32), (4, 4, 12, 4),
                                                   (7, 8, 16, 3),
                                                   (3, 3, 10, 5)):
            load = _random_load(rng, 5, experts, kind)
            cosel = rng.integers(0, 20, size=(5, experts, experts)) * (load[:, :, None] > 0)
            for policy in POLICIES:
                r = redundant if policy in USES_REDUNDANCY else 0
                slots = POLICIES[policy](load, num_gpus=gpus, gpus_per_node=per_node, redundant_experts=r,
                                         coselection=cosel, **traffic_inputs(policy, rng, 5, experts))
                check_slots(slots, experts, f"{policy} {kind} G={gpus} R={r}")
                assert ((slots >= 0).sum(axis=(1, 2)) == experts + r).all()


def test_contiguous_matches_published_anchor():
    load = olmoe_counts("arxiv")
    p8 = fit_placement("contiguous", load, num_gpus=8, gpus_per_node=8)
    p32 = fit_placement("contiguous", load, num_gpus=32, gpus_per_node=8)
    assert imbalance(expected_gpu_load(p8, load)).mean() == pytest.approx(1.661, abs=1e-3)
    assert imbalance(expected_gpu_load(p32, load)).mean() == pytest.approx(3.905, abs=1e-3)


@pytest.mark.parametrize("domain", ["arxiv", "github"])
@pytest.mark.parametrize("gpus,redundant", [(8, 0), (8, 8), (32, 32)])
def test_replicated_beats_greedy_on_real_counts(domain, gpus, redundant):
    load = olmoe_counts(domain)
    policy = "replicated" if redundant else "balanced"
    p = fit_placement(policy, load, num_gpus=gpus, gpus_per_node=8, redundant_experts=redundant)
    ours = imbalance(expected_gpu_load(p, load)).mean()
    greedy = greedy_reference(load, gpus, redundant)
    assert ours <= greedy + 1e-12
    # target (docs/benchmarks.md): excess at most a quarter of the greedy's (8.3% on arxiv)
    if redundant == 32:
        assert ours - 1 <= (greedy - 1) / 4


def test_coactivation_keeps_pairs_together():
    load = np.ones((1, 8))
    cosel = np.zeros((1, 8, 8))
    for a, b in ((0, 7), (1, 6), (2, 5), (3, 4)):
        cosel[0, a, b] = cosel[0, b, a] = 100
    p = fit_placement("coactivation", load, num_gpus=4, gpus_per_node=4, coselection=cosel)
    pairs = {tuple(sorted(r)) for r in p.slots[0].tolist()}
    assert pairs == {(0, 7), (1, 6), (2, 5), (3, 4)}


def test_placement_file(tmp_path):
    good = tmp_path / "p.json"
    good.write_text(json.dumps({"num_experts": 4, "layers": [[0, 1], [2, 3]]}))
    p = load_placement_file(good, num_experts=4, num_layers=2)
    assert p.slots.shape == (2, 2, 2)
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"layers": [[0, 1], [1, 3]]}))
    with pytest.raises(InputError, match="misses expert"):
        load_placement_file(bad, num_experts=4, num_layers=2)
    bad.write_text(json.dumps({"layers": [[0, 0], [2, 3], [1, -1]]}))
    with pytest.raises(InputError, match="same expert twice"):
        load_placement_file(bad, num_experts=4, num_layers=2)
    bad.write_text(json.dumps({"num_experts": 8, "layers": [[0, 1], [2, 3]]}))
    with pytest.raises(InputError, match="8 experts"):
        load_placement_file(bad, num_experts=4, num_layers=2)


def test_hardware_presets_and_files(tmp_path):
    assert GpuSpec.from_name("H100").bf16_flops == 989e12
    assert load_hardware("b200").hbm_bandwidth == 8.0e12
    f = tmp_path / "gpu.yaml"
    f.write_text("name: mine\nbf16_flops: 1e15\nhbm_bytes: 1e11\nhbm_bandwidth: 4e12\nscale_up_bandwidth: "
                 "4e11\n")
    with pytest.raises(InputError, match="missing field"):
        load_hardware(str(f))
    f.write_text(f.read_text() + "scale_out_bandwidth: 5e10\n")
    assert load_hardware(str(f)).scale_out_bandwidth == 5e10
    with pytest.raises(InputError, match="unknown GPU"):
        load_hardware("h900")
    with pytest.raises(InputError, match="not divisible"):
        ClusterLayout(12, 8)
    assert ClusterLayout(32, 8).num_nodes == 4


def test_policy_bad_input():
    load = np.ones((2, 10))
    with pytest.raises(InputError, match="unknown policy"):
        fit_placement("magic", load, num_gpus=2, gpus_per_node=2)
    with pytest.raises(InputError, match="not divisible into nodes"):
        fit_placement("balanced", load, num_gpus=12, gpus_per_node=8)
    with pytest.raises(InputError, match="must not be negative"):
        fit_placement("replicated", load, num_gpus=4, gpus_per_node=4, redundant_experts=-1)
    # A policy that cannot apply to this layout says so with its own exception type, which a command comparing
    # several policies turns into a skipped row; bad input stays a plain InputError.
    with pytest.raises(PlacementNotApplicable, match="^replicated: 31 redundant slots"):
        fit_placement("replicated", load, num_gpus=4, gpus_per_node=4, redundant_experts=31)  # 10 x 3 at most
    with pytest.raises(PlacementNotApplicable, match="^coactivation: needs co-selection") as info:
        fit_placement("coactivation", load, num_gpus=2, gpus_per_node=2)
    assert info.value.policy == "coactivation" and info.value.reason.startswith("needs co-selection")
    assert fit_placement("replicated", load, num_gpus=4, gpus_per_node=4,
                         redundant_experts=30).replica_counts.max() == 4


def _slot_counts(p: Placement) -> np.ndarray:
    """[L, G] filled slots per GPU."""
    return (p.slots >= 0).sum(axis=2)


@pytest.mark.parametrize("policy", list(POLICIES))
@pytest.mark.parametrize(("experts", "gpus", "per_node", "redundant"), [
    (16, 7, 8, 0),  # 7 GPUs for 16 experts: 3, 3 and five GPUs of 2
    (60, 8, 8, 0),  # Qwen1.5-MoE's 60 experts on 8 GPUs, no redundancy: four GPUs of 8, four of 7
    (64, 12, 4, 0),  # 12 GPUs on nodes of 4 with 64 experts: four GPUs of 6, eight of 5
    (16, 7, 8, 7),  # the old default redundancy that did not divide: 23 slots over 7 GPUs
    (64, 12, 4, 12),  # 76 slots over 12 GPUs in 3 nodes
])
def test_uneven_layouts(policy, experts, gpus, per_node, redundant):
    """Slot counts that do not divide: every policy builds a valid placement in which GPUs differ by at most
    one filled slot, the filled slots are exactly E + R (R only for the replicating policies), and the fitted
    policies still balance better than the contiguous layout."""
    rng = np.random.default_rng(experts + gpus)
    load = np.floor(rng.pareto(1.2, size=(3, experts)) * 50) + 1
    cosel = rng.integers(0, 20, size=(3, experts, experts))
    r = redundant if policy in USES_REDUNDANCY else 0
    p = fit_placement(policy, load, num_gpus=gpus, gpus_per_node=per_node, redundant_experts=r,
                      coselection=cosel, **traffic_inputs(policy, rng, 3, experts))
    filled = experts + r
    assert p.slots.shape == (3, gpus, -(-filled // gpus))
    counts = _slot_counts(p)
    assert (counts.sum(axis=1) == filled).all()
    assert (counts.max(axis=1) - counts.min(axis=1) <= 1).all()  # some GPUs hold one slot more, never two
    assert ((counts == filled // gpus + 1).sum(axis=1) == filled % gpus).all()
    check_slots(p.slots, experts, policy)
    np.testing.assert_allclose(expected_gpu_load(p, load).sum(axis=1), load.sum(axis=1))
    if policy in ("balanced", "replicated", "replicated-hier"):
        contiguous = fit_placement("contiguous", load, num_gpus=gpus, gpus_per_node=per_node)
        assert imbalance(expected_gpu_load(p, load)).mean() < imbalance(expected_gpu_load(contiguous,
                                                                                          load)).mean()


def test_uneven_balanced_by_hand():
    """5 experts on 2 GPUs, loads 5, 4, 3, 2, 2 (sum 16): the only even split is 5+3 | 4+2+2, so the GPUs hold
    2 and 3 experts and the smaller keeps one empty slot."""
    p = fit_placement("balanced", np.array([[5.0, 4, 3, 2, 2]]), num_gpus=2, gpus_per_node=2)
    np.testing.assert_array_equal(np.sort(expected_gpu_load(p, np.array([[5.0, 4, 3, 2, 2]]))[0]), [8, 8])
    assert sorted(_slot_counts(p)[0].tolist()) == [2, 3] and (p.slots == -1).sum() == 1


def test_default_redundancy_rounds_to_one_that_divides():
    assert default_redundant_experts(64, 8) == Redundancy(8)  # 72 slots, 9 per GPU: kept
    seven = default_redundant_experts(16, 7)  # 16 + 7 = 23 does not divide; 16 + 5 = 21 does
    assert (seven.redundant_experts == 5 and seven.note is not None
            and "rounded from 7 (one per GPU) to 5" in seven.note)
    assert "21 slots, 3 per GPU" in seven.note
    # 4 or 12 are both 4 away: the tie goes up
    assert default_redundant_experts(60, 8).redundant_experts == 12
    assert default_redundant_experts(64, 12).redundant_experts == 8  # 72 = 6 x 12
    for experts in range(1, 70):
        for gpus in range(1, 17):
            r = default_redundant_experts(experts, gpus).redundant_experts
            assert (experts + r) % gpus == 0 and 0 < r < 2 * gpus
    with pytest.raises(InputError, match="--gpus"):
        default_redundant_experts(16, 0)


def coactivation_reference(slots: np.ndarray, load: np.ndarray, cosel: np.ndarray, gpus_per_node: int,
                           node_weight: float, cap: float, max_passes: int,
                           attraction: np.ndarray) -> np.ndarray:
    """The coactivation swap search in plain Python, every candidate scored from scratch: each pass applies
    the swap of two slots on different GPUs that most raises the summed pair weight cosel[e, f] / (r_e r_f) of
    pairs sharing a GPU plus node_weight x pairs sharing a node (several nodes only), counted from both
    sides, plus twice the attraction [E, G] of each replica to its GPU (both in tokens), keeping GPU loads <=
    cap and no expert twice on a GPU."""
    out = slots.copy()
    g_count, s_count = out.shape
    counts = np.bincount(out[out >= 0], minlength=load.size).astype(float)
    per = np.divide(load, counts, out=np.zeros_like(load), where=counts > 0)
    multi = g_count > gpus_per_node

    def score(o: np.ndarray) -> float:
        total = 0.0
        cells = [(g, int(e)) for g in range(g_count) for e in o[g] if e >= 0]
        total += 2 * sum(attraction[e, g] for g, e in cells)
        for g, e in cells:
            for h, f in cells:
                if e == f:
                    continue
                w = cosel[e, f] / (counts[e] * counts[f])
                total += w * ((g == h) + node_weight * (multi and g // gpus_per_node == h // gpus_per_node))
        return total

    for _ in range(max_passes):
        base, best, move = score(out), 1e-12, None
        gpu = np.array([per[r[r >= 0]].sum() for r in out])
        for g1 in range(g_count):
            for s1 in range(s_count):
                for g2 in range(g1 + 1, g_count):
                    for s2 in range(s_count):
                        e1, e2 = out[g1, s1], out[g2, s2]
                        if e1 < 0 or e2 < 0 or e1 == e2 or e1 in out[g2] or e2 in out[g1]:
                            continue
                        if max(gpu[g1] - per[e1] + per[e2], gpu[g2] - per[e2] + per[e1]) > cap:
                            continue
                        out[g1, s1], out[g2, s2] = e2, e1
                        gain = score(out) - base
                        out[g1, s1], out[g2, s2] = e1, e2
                        if gain > best + 1e-9:
                            best, move = gain, (g1, s1, g2, s2)
        if move is None:
            break
        g1, s1, g2, s2 = move
        out[g1, s1], out[g2, s2] = out[g2, s2], out[g1, s1]
    return out


@pytest.mark.parametrize("seed", range(4))
def test_coactivation_kernel_matches_plain_reference(seed):
    # The kernel keeps pair weights per GPU and node up to date instead of rescanning (DeepSeek-V3 sizes fit
    # in ~1.6 s instead of ~2 min); the swaps it makes must be the ones a from-scratch search makes.
    from simulator.placement.packing import coactivation_layer
    from simulator.placement.policies import replicated

    rng = np.random.default_rng(seed)
    experts, gpus, per_node, redundant = 12, 4, 2 if seed % 2 else 4, 4
    load = rng.pareto(1.5, size=(1, experts)) + 0.1
    cosel = rng.random((experts, experts)) * 50
    cosel = cosel + cosel.T  # co-selection counts are symmetric; the score counts each pair from both sides
    slots = replicated(load, num_gpus=gpus, gpus_per_node=per_node,
                       redundant_experts=redundant)[0].astype(np.int64)
    cap = 1.3 * load.sum() / gpus
    # half the seeds add an attraction of replicas to GPUs (the affinity policy's cross-layer term)
    attraction = rng.random((experts, gpus)) * 80 if seed >= 2 else np.zeros((experts, gpus))
    fast = coactivation_layer(slots, load[0], cosel, per_node, 4.0, cap, 50, attraction)
    slow = coactivation_reference(slots, load[0], cosel, per_node, 4.0, cap, 50, attraction)
    assert not np.array_equal(fast, slots)  # some swap was worth making
    np.testing.assert_array_equal(fast, slow)


def test_contiguous_lays_out_counts_that_do_not_divide():
    """Qwen1.5-MoE's 60 experts on 8 GPUs: runs of 8 on the first four, 7 and an empty slot on the others."""
    slots = fit_placement("contiguous", np.ones((3, 60)), num_gpus=8, gpus_per_node=8).slots
    assert slots.shape == (3, 8, 8)
    held = slots[0][slots[0] >= 0]
    assert sorted(held.tolist()) == list(range(60))  # every expert exactly once
    assert [int((row >= 0).sum()) for row in slots[0]] == [8, 8, 8, 8, 7, 7, 7, 7]
    assert slots[0, 4, :7].tolist() == list(range(32, 39)) and slots[0, 4, 7] == -1
    assert (slots == slots[0]).all()  # every layer alike


def test_round_robin_lays_out_counts_that_do_not_divide():
    slots = fit_placement("round-robin", np.ones((2, 16)), num_gpus=7, gpus_per_node=7).slots
    assert slots.shape == (2, 7, 3)
    assert sorted(slots[0][slots[0] >= 0].tolist()) == list(range(16))
    assert slots[0, 1].tolist() == [1, 8, 15] and slots[0, 2].tolist() == [2, 9, -1]


def _best_max_per_replica(load: np.ndarray, num_slots: int, cap: int) -> float:
    """Brute force: the smallest max(load / counts) over all counts in 1..cap summing to num_slots."""
    import itertools

    best = np.inf
    for counts in itertools.product(range(1, cap + 1), repeat=load.size):
        if sum(counts) == num_slots:
            best = min(best, float((load / np.array(counts)).max()))
    return best


def test_replica_counts_minmax_by_hand_and_against_brute_force():
    # [8, 4, 2, 2] with 2 extra slots: expert 0 takes the first (8 -> 4 per replica); then experts 0 and 1 tie
    # at 4 and the first wins, leaving the largest load per replica at 4 (expert 1), the best any split can
    # do.
    counts = replica_counts_minmax(np.array([8.0, 4, 2, 2]), 6, 4)
    np.testing.assert_array_equal(counts, [3, 1, 1, 1])
    np.testing.assert_array_equal(replica_counts_minmax(np.array([100.0, 1]), 4, 2), [2, 2])  # the cap binds
    rng = np.random.default_rng(4)
    for _ in range(40):
        experts = int(rng.integers(1, 5))
        cap = int(rng.integers(1, 4))
        load = rng.integers(0, 20, size=experts).astype(np.float64)
        num_slots = int(rng.integers(experts, experts * cap + 1))
        counts = replica_counts_minmax(load, num_slots, cap)
        assert counts.sum() == num_slots and counts.min() >= 1 and counts.max() <= cap
        assert (load / counts).max() == _best_max_per_replica(load, num_slots, cap)


def test_pack_counts_spreads_empty_slots_one_per_gpu():
    """Two experts on two GPUs of two slots: each GPU holds one expert and one empty slot, never both empties
    on one GPU (which would stack both experts on the other)."""
    from simulator.placement.packing import pack_counts

    slots = pack_counts(np.array([3.0, 1.0]), np.array([1, 1]), 2, 2, 2, 100)
    assert sorted(slots.max(axis=1).tolist()) == [0, 1] and (slots == -1).sum(axis=1).tolist() == [1, 1]
    # three replicas of a hot expert and one cold expert over 3 GPUs of 2 slots, one slot left empty
    slots = pack_counts(np.array([9.0, 1.0]), np.array([3, 1]), 3, 2, 2, 100)
    assert (slots == 0).sum(axis=1).tolist() == [1, 1, 1] and (slots == -1).sum() == 2
