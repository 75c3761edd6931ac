"""simulator/calibrate/comm.py on CPU: pair counts, the link fit, and the all-to-all over a 2-rank gloo
group."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from simulator.calibrate.comm import (
    _measure_on_rank,
    calibrate_all_to_all,
    fit_link,
    pair_token_counts,
    run_on_ranks,
    scaled_pair_counts,
)


def _brute_pairs(ids: np.ndarray, slot_gpu: np.ndarray, g: int) -> np.ndarray:
    counts = np.zeros((g, g), dtype=np.int64)
    for t, row in enumerate(ids.tolist()):
        src = t % g
        for dst in {int(slot_gpu[e]) for e in row if e >= 0}:
            if dst != src:
                counts[src, dst] += 1
    return counts


def _routing(rng: np.random.Generator, tokens: int, experts: int, top_k: int) -> np.ndarray:
    return np.stack([rng.choice(experts, top_k, replace=False) for _ in range(tokens)])


@pytest.mark.parametrize("g", [2, 3, 4, 8])
def test_pair_token_counts_matches_brute_force(g: int) -> None:
    rng = np.random.default_rng(0)
    experts = 16
    ids = _routing(rng, 203, experts, 4)
    slot_gpu = rng.integers(0, g, experts)
    counts = pair_token_counts(ids, slot_gpu, g)
    assert counts.dtype == np.int64 and counts.shape == (g, g)
    np.testing.assert_array_equal(counts, _brute_pairs(ids, slot_gpu, g))
    assert not np.diag(counts).any()


def test_pair_token_counts_unique_pairs_and_padding() -> None:
    slot_gpu = np.array([0, 0, 1, 1])  # experts 0,1 on GPU 0; 2,3 on GPU 1
    ids = np.array([[2, 3],  # token 0 (GPU 0): two experts on GPU 1 -> one copy
                    [0, 1],  # token 1 (GPU 1): two on GPU 0 -> one copy
                    [0, 1],  # token 2 (GPU 0): both local -> nothing
                    [3, -1]])  # token 3 (GPU 1): local, padding ignored -> nothing
    np.testing.assert_array_equal(pair_token_counts(ids, slot_gpu, 2), [[0, 1], [1, 0]])
    np.testing.assert_array_equal(pair_token_counts(ids, slot_gpu, 2), _brute_pairs(ids, slot_gpu, 2))


def test_scaled_pair_counts() -> None:
    pairs = np.array([[0, 15, 10], [20, 0, 5], [7, 1, 0]])  # sampled from 60 tokens: 20 per GPU
    np.testing.assert_array_equal(scaled_pair_counts(pairs, tokens_per_gpu=20, tokens_in_sample=60), pairs)
    quadrupled = scaled_pair_counts(pairs, tokens_per_gpu=80, tokens_in_sample=60)
    assert quadrupled.dtype == np.int64
    np.testing.assert_array_equal(quadrupled, pairs * 4)
    quarter = scaled_pair_counts(pairs, tokens_per_gpu=5, tokens_in_sample=60)
    assert quarter.dtype == np.int64
    np.testing.assert_array_equal(quarter, np.rint(pairs / 4).astype(np.int64))
    # never more tokens to one GPU than the sender has
    assert scaled_pair_counts(np.array([[0, 30], [0, 0]]), 20, 40).max() == 20


@pytest.mark.parametrize("latency", [0.0, 25e-6])
def test_fit_link_recovers_exact_model(latency: float) -> None:
    d_bw, c_bw = 150e9, 120e9
    sizes = [4e3, 3e5, 2.5e6, 4e7]
    points = [{"bytes_per_gpu": b, "dispatch_s": latency + b / d_bw, "combine_s": latency + b / c_bw}
              for b in sizes]
    dispatch, combine, lat = fit_link(points)
    assert dispatch == pytest.approx(d_bw, rel=1e-6)
    assert combine == pytest.approx(c_bw, rel=1e-6)
    assert lat == pytest.approx(latency, rel=1e-6, abs=1e-12)


def test_fit_link_negative_latency_refits_through_zero() -> None:
    points = [{"bytes_per_gpu": b, "dispatch_s": b / 1e9 - 1e-6, "combine_s": b / 2e9 - 1e-6}
              for b in (1e4, 1e5, 1e6)]
    dispatch, combine, lat = fit_link(points)
    assert lat == 0.0
    assert dispatch > 0 and combine > 0 and math.isfinite(dispatch) and math.isfinite(combine)


def test_calibrate_all_to_all_gloo() -> None:
    rng = np.random.default_rng(1)
    experts, hidden, g = 8, 64, 2
    ids = _routing(rng, 64, experts, 2)
    slot_gpu = (np.arange(experts) * g) // experts
    tokens = (4, 16)
    out = calibrate_all_to_all(ids, slot_gpu, hidden, g, tokens_per_gpu=tokens, backend="gloo", repeats=2)
    assert out["source"] == "measured"
    for key in ("dispatch_bytes_per_s", "combine_bytes_per_s"):
        assert out[key] > 0 and math.isfinite(out[key])
    assert out["latency_s"] >= 0 and math.isfinite(out["latency_s"])
    sample = _brute_pairs(ids, slot_gpu, g)
    assert [p["tokens_per_gpu"] for p in out["points"]] == list(tokens)
    for n, p in zip(tokens, out["points"], strict=True):
        pairs = scaled_pair_counts(sample, n, len(ids))
        worst = max(max(int(pairs[r, :].sum()), int(pairs[:, r].sum())) for r in range(g))
        assert p["bytes_per_gpu"] == worst * hidden * 2
        assert p["dispatch_s"] > 0 and p["combine_s"] > 0
        assert set(p) == {"tokens_per_gpu", "bytes_per_gpu", "dispatch_s", "combine_s"}


def test_all_to_all_delivers_the_right_rows() -> None:
    """Every rank gets exactly the rows meant for it, in dispatch and back in combine (uneven and empty splits
    included); `check` raises on any wrong block, which spawn re-raises here."""
    pairs_list = [np.array([[0, 3, 1], [5, 0, 0], [2, 4, 0]]), np.array([[0, 0, 0], [1, 0, 7], [0, 2, 0]])]
    out = run_on_ranks(3, _measure_on_rank, pairs_list, 8, 1, 0, torch.bfloat16, True, backend="gloo")
    assert [p["bytes_per_gpu"] for p in out] == [7 * 8 * 2, 8 * 8 * 2]
