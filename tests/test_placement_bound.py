"""The lower bound on static placement: never above any policy's result nor above the true optimum of tiny
layouts found by enumeration, exact where the answer is known, its pieces against plain references, and
`moe-sim place --explain`."""

from __future__ import annotations

import itertools
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from simulator.placement import (
    POLICIES,
    PlacementNotApplicable,
    expected_gpu_load,
    fit_placement,
    imbalance,
)
from simulator.placement.bound import (
    counts_bound,
    exact_counts_bound,
    fill_exactly,
    layer_lower_bound,
    lower_bound,
    optimality_gap,
    placement_bound,
    replica_fill_bounds,
)

ROOT = Path(__file__).resolve().parent.parent
COUNTS = ROOT / "data" / "olmoe_expert_counts.json"


def random_case(rng: np.random.Generator) -> tuple[np.ndarray, int, int]:
    """(load [2, E] with heavy tails and some never-chosen experts, G, R)."""
    experts = int(rng.integers(2, 20))
    gpus = int(rng.choice([1, 2, 3, 4, 8]))
    load = np.round(rng.pareto(1.0, (2, experts)) * rng.integers(0, 2, (2, experts)) * 100)
    redundant = int(rng.integers(0, min(experts * (gpus - 1), 2 * gpus) + 1)) if gpus > 1 else 0
    return load, gpus, redundant


def test_bound_never_above_any_policy():
    rng = np.random.default_rng(7)
    checked = 0
    for _ in range(60):
        load, gpus, redundant = random_case(rng)
        cosel = rng.integers(0, 5, (2, load.shape[1], load.shape[1])).astype(np.float64)
        for policy in POLICIES:
            try:
                placement = fit_placement(policy, load, num_gpus=gpus, gpus_per_node=gpus,
                                          redundant_experts=redundant, coselection=cosel)
            except PlacementNotApplicable:
                continue
            bound = placement_bound(placement, load)
            ratio = imbalance(expected_gpu_load(placement, load))
            assert (bound.imbalance <= ratio).all(), (policy, load, gpus, redundant)
            assert (bound.peak <= expected_gpu_load(placement, load).max(axis=1)).all()
            assert (optimality_gap(placement, load, bound) >= 0).all()
            checked += 1
    assert checked > 200


def brute_force_peak(w: np.ndarray, gpus: int, slots: int, filled: int) -> float:
    """The least heaviest GPU over every placement of the layout (replica counts and GPU sets enumerated)."""
    experts = w.size
    best = np.inf
    for counts in itertools.product(range(1, gpus + 1), repeat=experts):
        if sum(counts) != filled:
            continue
        choices = [list(itertools.combinations(range(gpus), c)) for c in counts]
        for sets in itertools.product(*choices):
            held = np.zeros(gpus, dtype=np.int64)
            gpu_load = np.zeros(gpus)
            for e, on in enumerate(sets):
                for g in on:
                    held[g] += 1
                    gpu_load[g] += w[e] / counts[e]
            if held.max() <= slots:
                best = min(best, gpu_load.max())
    return float(best)


def test_bound_never_above_the_optimum_of_tiny_layouts():
    rng = np.random.default_rng(3)
    tight = 0
    for _ in range(40):
        experts = int(rng.integers(2, 5))
        gpus = int(rng.integers(1, 4))
        redundant = int(rng.integers(0, min(experts * (gpus - 1), 3) + 1))
        filled = experts + redundant
        slots = -(-filled // gpus)
        w = np.round(rng.pareto(0.8, experts) * 10) * rng.integers(0, 2, experts)
        optimum = brute_force_peak(w, gpus, slots, filled)
        bound = layer_lower_bound(w, num_gpus=gpus, slots_per_gpu=slots, filled=filled)
        assert bound <= optimum, (w, gpus, redundant)
        tight += bool(np.isclose(bound, optimum))
    assert tight >= 20  # tight on most tiny layouts, not just valid


def test_bound_is_exact_where_the_optimum_is_known():
    # two experts per GPU, no replicas: pairing heaviest with lightest is optimal, and the bound finds it
    w = np.array([9.0, 7, 6, 4, 3, 1])
    assert layer_lower_bound(w, num_gpus=3, slots_per_gpu=2, filled=6) == pytest.approx(10.0)
    # one hot expert worth half the layer, replicated onto 2 of 4 GPUs: each replica is the mean
    w = np.array([8.0, 2, 2, 2, 2])
    assert layer_lower_bound(w, num_gpus=4, slots_per_gpu=2, filled=6) == pytest.approx(4.0)
    # uniform loads: the mean, and the balanced policy meets it (gap 0)
    load = np.full((2, 16), 5.0)
    placement = fit_placement("balanced", load, num_gpus=4, gpus_per_node=4)
    np.testing.assert_allclose(optimality_gap(placement, load), 0.0, atol=1e-8)
    # an empty layer: nothing to balance
    empty = lower_bound(np.zeros((1, 4)), num_gpus=2, slots_per_gpu=2, filled=4)
    assert empty.imbalance[0] == pytest.approx(1.0)


def fill_reference(w: np.ndarray, gpus: int, slots: int, filled: int) -> np.ndarray:
    """h [E, K] by listing the other experts' lightest possible items one by one."""
    experts = w.size
    extra = filled - experts
    out = np.empty((experts, min(gpus, extra + 1)))
    for k in range(1, out.shape[1] + 1):
        rho = max(1, min(gpus, extra - (k - 1) + 1))
        need = max(0, k * (slots - 1) - (gpus * slots - filled))
        for e in range(experts):
            items = sorted(w[f] / rho for f in range(experts) if f != e for _ in range(min(k, rho)))
            out[e, k - 1] = (w[e] + sum(items[:need])) / k
    return out


def test_replica_fill_bounds_match_the_plain_reference():
    rng = np.random.default_rng(0)
    for _ in range(150):
        experts, gpus = int(rng.integers(2, 12)), int(rng.integers(1, 6))
        redundant = int(rng.integers(0, experts * (gpus - 1) + 1))
        filled = experts + redundant
        slots = -(-filled // gpus)
        w = rng.random(experts) * rng.integers(0, 3, experts)
        np.testing.assert_allclose(replica_fill_bounds(w, gpus, slots, filled),
                                   fill_reference(w, gpus, slots, filled))


def test_exact_counts_program_matches_enumeration():
    # random h tables whose rows rise and fall, so counts summing exactly to `filled` cost something
    rng = np.random.default_rng(5)
    solved = 0
    for _ in range(25):
        experts, max_count = int(rng.integers(2, 5)), int(rng.integers(2, 5))
        filled = int(rng.integers(experts, experts * max_count + 1))
        h = rng.random((experts, max_count)) * 10 + 1
        mean = 0.5
        low, counts = counts_bound(h, mean, filled)
        cap, _ = fill_exactly(h, counts, filled)
        exact = min(max(mean, max(h[e, k - 1] for e, k in enumerate(c)))
                    for c in itertools.product(range(1, max_count + 1), repeat=experts) if sum(c) == filled)
        assert low <= exact + 1e-12 <= cap + 1e-12
        assert exact_counts_bound(h, mean, filled, low, max(cap, low)) == pytest.approx(exact, rel=1e-6)
        solved += cap > low
    assert solved >= 5  # the HiGHS path was needed, not only the sort


def moe_sim(*args: str | Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "cli.py"), *map(str, args)], capture_output=True,
                          text=True, cwd=ROOT, timeout=300)


def test_place_explain_reports_each_policy_gap(tmp_path: Path):
    result = moe_sim("place", COUNTS, "--gpus", "32", "--redundant-experts", "32", "-o", tmp_path / "p.json",
                     "--explain", "--json")
    assert result.returncode == 0, result.stderr
    rows = {row["policy"]: row for row in json.loads(result.stdout)["explain"]}
    assert set(rows) == set(POLICIES)
    assert rows["coactivation"]["skipped"] and rows["coactivation"]["gap_mean"] is None
    assert rows["balanced"]["gap_worst"] == pytest.approx(0.0, abs=1e-8)  # proved optimal without replicas
    assert rows["replicated"]["redundant_experts"] == 32 and rows["contiguous"]["redundant_experts"] == 0
    for row in rows.values():
        if row["skipped"] is None:
            assert 0 <= row["gap_mean"] <= row["gap_worst"]
            assert row["imbalance_mean"] >= row["bound_mean"]
    text = moe_sim("place", COUNTS, "--gpus", "8", "--redundant-experts", "8", "-o", tmp_path / "p.json",
                   "--force", "--explain")
    assert text.returncode == 0, text.stderr
    assert "worst gap" in text.stdout and "bound: no placement" in text.stdout
