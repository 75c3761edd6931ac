"""The measured non-GEMM work R(a): isotonic smoothing of noisy grids, the curve from measured points, the
model built from measurements alone (tile chosen from GEMM-only times), kernel == NumPy twin, profile round
trip."""

from __future__ import annotations

import numpy as np
import pytest
import yaml
from test_cost_profile import META, h200, hand_table, profile_dict, write_dict

from simulator import expert_time as X
from simulator import kernels as K
from simulator.cost_model import cost_row
from simulator.profiles import GRID_LOG2_ASSIGNMENTS, load_profile, write_profile


def test_isotonic_pools_violators_and_keeps_monotone_input():
    np.testing.assert_allclose(X.isotonic(np.array([1.0, 3.0, 2.0, 4.0])), [1.0, 2.5, 2.5, 4.0])
    np.testing.assert_allclose(X.isotonic(np.array([5.0, 1.0, 1.0, 1.0])), [2.0, 2.0, 2.0, 2.0])
    np.testing.assert_allclose(X.isotonic(np.array([2.0, 1.0]), np.array([3.0, 1.0])), [1.75, 1.75])
    up = np.array([0.5, 1.0, 1.0, 7.0])
    np.testing.assert_array_equal(X.isotonic(up), up)


def test_fill_table_averages_a_noisy_spike_instead_of_keeping_it():
    measured = hand_table()
    spiky = measured.copy()
    spiky[3, 3] *= 1.3  # the first cell of a row measured 30% high (as a cold first launch reads)
    filled = X.fill_table(spiky)
    assert filled[3, 3] < spiky[3, 3]
    assert filled[3, 4] < spiky[3, 3]  # a running maximum would have carried the spike along the row
    assert (np.diff(filled, axis=1) >= 0).all() and (np.diff(filled, axis=0) >= 0).all()


def test_overhead_curve_medians_isotonic_and_proportional_past_the_points():
    pts = [(1, 4e-5), (1, 5e-5), (1, 6e-5), (4, 4e-5), (16, 7e-5), (256, 1e-4), (256, 3e-4), (256, 2e-4)]
    curve = X.overhead_curve(pts)
    assert curve.shape == (len(GRID_LOG2_ASSIGNMENTS),)
    pooled = (5e-5 * 4e-5) ** 0.5  # median 5e-5 at a=1 pooled with 4e-5 at a=4 (a violation), on log2 seconds
    assert curve[0] == pytest.approx(pooled) and curve[2] == pytest.approx(pooled)
    assert curve[4] == pytest.approx(7e-5) and curve[8] == pytest.approx(2e-4)
    assert curve[6] == pytest.approx(2 ** ((np.log2(7e-5) + np.log2(2e-4)) / 2))  # log-log between measured
    assert curve[9] == pytest.approx(4e-4) and curve[-1] == pytest.approx(2e-4 * 2 ** (16 - 8))
    assert X.overhead_lookup(curve, 2 ** 18) == pytest.approx(curve[-1] * 4)
    assert X.overhead_lookup(curve, 0) == curve[0]


def truth_curve() -> np.ndarray:
    a = 2.0 ** np.asarray(GRID_LOG2_ASSIGNMENTS)
    return 3e-5 + 4e-9 * a + 2e-6 * np.log2(a)


def _tile_samples(table, curve, tile, seed):
    rng = np.random.default_rng(seed)
    samples = []
    for _ in range(40):
        n = int(rng.integers(2, 100))
        counts = np.floor(rng.pareto(1.1, n) * rng.integers(3, 300)).astype(np.int64)
        counts[0] += 1
        g = X.gemm_lookup(table, float((counts > 0).sum()), X.padded_rows(counts, tile))
        samples.append(X.Sample(counts, g + X.overhead_lookup(curve, float(counts.sum())), g))
    return samples


def test_measured_model_picks_the_tile_from_the_whole_work_and_checks_it():
    table, curve, tile = hand_table(), truth_curve(), 32
    points = [(2**k, float(curve[k])) for k in GRID_LOG2_ASSIGNMENTS]
    samples = _tile_samples(table, curve, tile, 3)
    work = X.fit_measured_work(table, samples, points)
    assert work.tile_rows == tile and work.fixed_seconds == 0 and work.per_assignment_seconds == 0
    assert work.overhead_seconds is not None
    np.testing.assert_allclose(work.overhead_seconds, curve, rtol=1e-12)
    assert work.residuals["mean_abs"] < 1e-9 and work.residuals["gemm_mean_abs"] < 1e-9
    bumped = samples[0].counts.copy()
    bumped[0] += 1
    assert X.expert_seconds(bumped, work) >= X.expert_seconds(samples[0].counts, work)


def test_one_tile_serves_every_shape_and_a_refit_reproduces_the_fit():
    curve = truth_curve()
    points = [(2**k, float(curve[k])) for k in GRID_LOG2_ASSIGNMENTS]
    small, big = hand_table(), hand_table() * 3.0
    shapes = [(small, _tile_samples(small, curve, 64, 4), points),
              (big, _tile_samples(big, curve, 64, 5), points)]
    works = X.fit_measured_works(shapes)
    assert [w.tile_rows for w in works] == [64, 64]
    assert all(w.residuals["mean_abs"] < 1e-9 for w in works)
    again = X.fit_measured_works([X.refit_work(w) for w in works])
    for a, b in zip(works, again, strict=True):
        assert a.tile_rows == b.tile_rows
        np.testing.assert_array_equal(a.gemm_seconds, b.gemm_seconds)
        np.testing.assert_array_equal(a.overhead_seconds, b.overhead_seconds)
    with pytest.raises(ValueError, match="no measurements to re-fit"):
        X.refit_work(X.ExpertWork(small, 16, 1e-6, 1e-9))


def test_kernel_prices_the_overhead_as_numpy_and_profile_round_trips(tmp_path):
    data = profile_dict()
    expert = data["shapes"][0]["expert"]
    expert |= {"fixed_seconds": 0.0, "per_assignment_seconds": 0.0,
               "grid_log2_assignments": list(GRID_LOG2_ASSIGNMENTS),
               "overhead_seconds": truth_curve().tolist(), "overhead_measured": [[1, 3e-5], [2, 3.3e-5]]}
    path = write_dict(tmp_path / "r.yaml", data)
    work = load_profile(path).shapes[0].expert
    assert work.overhead_measured == ((1, 3e-5), (2, 3.3e-5))
    row = cost_row(h200(path), META)
    assert row[K.C_OVERHEAD] == 1.0
    rng = np.random.default_rng(4)
    for n, scale in ((8, 3), (64, 300), (64, 4000)):  # 64 x 4000: past the grid's 65536 assignments
        counts = rng.integers(0, scale, n)
        x, a = int((counts > 0).sum()), float(counts.sum())
        w = X.padded_rows(counts, work.tile_rows)
        assert K.profiled_expert_seconds(row, x, w, a) == pytest.approx(X.expert_seconds(counts, work),
                                                                        rel=1e-12)
    out = tmp_path / "copy.yaml"
    write_profile(load_profile(path), out)
    again = load_profile(out).shapes[0].expert
    assert again.overhead_seconds is not None and work.overhead_seconds is not None
    np.testing.assert_allclose(again.overhead_seconds, work.overhead_seconds, rtol=1e-4)


def test_a_decreasing_overhead_curve_is_refused(tmp_path):
    data = profile_dict()
    data["shapes"][0]["expert"] |= {"grid_log2_assignments": list(GRID_LOG2_ASSIGNMENTS),
                                    "overhead_seconds": truth_curve()[::-1].tolist()}
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(data))
    with pytest.raises(Exception, match="overhead_seconds must not decrease"):
        load_profile(path)


def test_version_1_profile_prices_as_before(tmp_path):
    """A version-1 file (rows grid of powers of two) loads onto today's grid and prices exactly as its log-log
    line between powers of two did."""
    from simulator.profiles import V1_GRID_LOG2_ROWS

    x = X.grid_experts()[:, None]
    w = 2.0 ** np.asarray(V1_GRID_LOG2_ROWS, dtype=np.float64)[None, :]
    old = np.maximum.accumulate(np.maximum.accumulate(5e-6 + x * 2e-6 + w**0.7 * 1e-7, axis=1), axis=0)
    data = profile_dict()
    data["version"] = 1
    expert = data["shapes"][0]["expert"]
    del expert["grid_rows"]
    expert |= {"grid_log2_rows": list(V1_GRID_LOG2_ROWS), "gemm_seconds": old.tolist()}
    work = load_profile(write_dict(tmp_path / "v1.yaml", data)).shapes[0].expert
    for xi, wi in ((1, 1.0), (3, 5.0), (8, 300.0), (64, 3000.0), (256, 131072.0), (7, 1e6)):
        lx, lw = np.log2(xi), np.log2(min(wi, 2.0**17))
        i, j = min(int(lx), 7), min(int(lw), 16)
        u, v = lx - i, lw - j
        lt = np.log2(old[i:i + 2, j:j + 2])
        expect = 2 ** ((1 - u) * (1 - v) * lt[0, 0] + u * (1 - v) * lt[1, 0] + (1 - u) * v * lt[0, 1]
                       + u * v * lt[1, 1])
        expect *= max(wi / 2.0**17, 1.0)
        assert X.gemm_lookup(work.gemm_seconds, xi, wi) == pytest.approx(expect, rel=1e-9)
