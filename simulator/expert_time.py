"""The calibrated expert-time model: pure formulas over a profile's tables (docs/cost-model.md, "Measured
expert time").

One GPU's routed-expert time in one layer, from its per-expert assignment counts c_e (after capacity
dropping):

    T = R(a) + G(x, W),   a = sum c_e,  x = #{e : c_e > 0},
    W = sum over e with c_e > 0 of ceil(c_e / tile) x tile

G is the measured grouped-GEMM table, bilinear in (log2 x, log2 W) on log2 seconds, proportional in x or W
past the grid's last point. R is the measured non-GEMM work (sort, gather, activation, weighting,
scatter-add), linear in log-log between its grid points and proportional past the last; profiles written
before R was measured carry a fitted line fixed + per_assignment x a instead. The kernel
(kernels.profiled_expert_seconds) and the NumPy reference below compute the same thing.

Shapes and GPUs that were not measured are derived, never silently: a table measured for hidden h0 x FFN f0
scales by (h f) / (h0 f0) (both the weight bytes and the FLOPs per row scale so); a table measured on one GPU
moves to another by the ratio of the two GPUs' rooflines at each grid point, which keeps the measured
efficiency.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from simulator.profiles import (
    GRID_LOG2_ASSIGNMENTS,
    GRID_LOG2_EXPERTS,
    GRID_LOG2_TOKENS,
    GRID_ROWS,
    ExpertWork,
    NonExpertWork,
)

NX, NW, NA = len(GRID_LOG2_EXPERTS), len(GRID_ROWS), len(GRID_LOG2_ASSIGNMENTS)
# [NW] positions of the rows grid, not evenly spaced
LOG2_ROWS = np.log2(np.asarray(GRID_ROWS, dtype=np.float64))
TILE_CANDIDATES = (1, 16, 32, 64, 128, 256)


def isotonic(y: np.ndarray, weight: np.ndarray | None = None) -> np.ndarray:
    """The non-decreasing sequence closest to y in weighted least squares (pool adjacent violators).

    Measured times are noisy; a running maximum would keep every upward spike, this averages them away."""
    values: list[float] = []
    weights: list[float] = []
    sizes: list[int] = []
    w = np.ones(len(y)) if weight is None else np.asarray(weight, dtype=np.float64)
    for yi, wi in zip(np.asarray(y, dtype=np.float64), w, strict=True):
        values.append(float(yi))
        weights.append(float(wi))
        sizes.append(1)
        while len(values) > 1 and values[-2] > values[-1]:
            pooled = weights[-2] + weights[-1]
            values[-2:] = [(values[-2] * weights[-2] + values[-1] * weights[-1]) / pooled]
            weights[-2:] = [pooled]
            sizes[-2:] = [sizes[-2] + sizes[-1]]
    return np.repeat(values, sizes)


def grid_experts() -> np.ndarray:
    return 2.0 ** np.asarray(GRID_LOG2_EXPERTS, dtype=np.float64)


def grid_rows() -> np.ndarray:
    return np.asarray(GRID_ROWS, dtype=np.float64)


def fill_table(measured: np.ndarray) -> np.ndarray:
    """A complete, monotone [NX, NW] table from measurements (NaN where not measured).

    Each row's measurements are first made non-decreasing by isotonic regression on log2 seconds (noise
    averaged, not kept). Rows left of their first measurement (fewer rows than experts: impossible in
    practice) take that first value; right of their last, time grows in proportion to rows, capped by what
    more experts measured at the same rows (so a guess never overrides a measurement in the running maximum
    below); an unmeasured x between measured ones is interpolated in log-log, and above the largest measured x
    time grows in proportion to x. Then a running maximum along rows and along experts makes the table
    monotone in both, so the model is monotone in the counts.
    """
    t = np.array(measured, dtype=np.float64)
    if t.shape != (NX, NW):
        raise ValueError(f"table must be [{NX}, {NW}], got {list(t.shape)}")
    w = grid_rows()
    last_row = -1
    for i in range(NX):
        ok = np.isfinite(t[i])
        if ok.any():
            t[i, ok] = 2.0 ** isotonic(np.log2(t[i, ok]))
    raw = t.copy()
    for i in range(NX):
        ok = np.flatnonzero(np.isfinite(t[i]))
        if ok.size == 0:
            continue
        last_row = i
        t[i, : ok[0]] = t[i, ok[0]]
        inner = np.isnan(t[i, : ok[-1] + 1])
        if inner.any():  # a gap inside the row: interpolate in log-log
            gap = np.flatnonzero(inner)
            t[i, gap] = 2 ** np.interp(LOG2_ROWS[gap], LOG2_ROWS[ok], np.log2(t[i, ok]))
        for j in range(ok[-1] + 1, NW):
            # past the row's last point: in proportion to rows, but never above what more experts measured at
            # the same rows (the same work spread over fewer experts reads fewer weights)
            grown = t[i, j - 1] * w[j] / w[j - 1]
            more = raw[i + 1:, j]
            more = more[np.isfinite(more)]
            t[i, j] = max(t[i, j - 1], min(grown, float(more.min()))) if more.size else grown
    if last_row < 0:
        raise ValueError("no measured points")
    measured_rows = [i for i in range(NX) if np.isfinite(t[i]).all()]
    for i in range(NX):
        if i in measured_rows:
            continue
        below = [r for r in measured_rows if r < i]
        above = [r for r in measured_rows if r > i]
        if below and above:  # between measured x: log-log interpolation along x
            lo, hi = below[-1], above[0]
            f = (i - lo) / (hi - lo)
            t[i] = 2.0 ** ((1 - f) * np.log2(t[lo]) + f * np.log2(t[hi]))
        elif below:  # past the largest measured x: in proportion to x
            t[i] = t[below[-1]] * 2.0 ** (i - below[-1])
        else:
            t[i] = t[above[0]]
    t = np.maximum.accumulate(t, axis=1)
    return np.maximum.accumulate(t, axis=0)


def padded_rows(counts: np.ndarray, tile: int) -> float:
    c = counts[counts > 0]
    return float((np.ceil(c / tile) * tile).sum())


def gemm_lookup(table: np.ndarray, x: float, w: float) -> float:
    """G(x, W): bilinear on log2 seconds in (log2 x, log2 W); proportional past the grid (NumPy reference)."""
    if x <= 0:
        return 0.0
    lx, lw, scale = math.log2(x), math.log2(max(w, 1.0)), 1.0
    if lx > NX - 1:
        scale *= x / 2.0 ** (NX - 1)
        lx = NX - 1
    if lw > LOG2_ROWS[-1]:
        scale *= w / GRID_ROWS[-1]
        lw = float(LOG2_ROWS[-1])
    i = min(int(lx), NX - 2)
    j = min(int(np.searchsorted(LOG2_ROWS, lw, side="right")) - 1, NW - 2)
    u, v = lx - i, (lw - LOG2_ROWS[j]) / (LOG2_ROWS[j + 1] - LOG2_ROWS[j])
    lt = np.log2(table[i: i + 2, j: j + 2])
    log_t = (1 - u) * (1 - v) * lt[0, 0] + u * (1 - v) * lt[1, 0] + (1 - u) * v * lt[0, 1] + u * v * lt[1, 1]
    return scale * 2.0 ** log_t


def overhead_lookup(curve: np.ndarray, a: float) -> float:
    """R(a): log-log interpolation on the assignments grid, R(1) below one, proportional past the grid."""
    la = math.log2(max(a, 1.0))
    if la >= NA - 1:
        return float(curve[-1]) * a / 2.0 ** (NA - 1)
    i = int(la)
    u = la - i
    return float(2.0 ** ((1 - u) * math.log2(curve[i]) + u * math.log2(curve[i + 1])))


def expert_seconds(counts: np.ndarray, work: ExpertWork) -> float:
    """One GPU's expert time in one layer from its per-expert counts (NumPy reference of the kernel)."""
    counts = np.asarray(counts, dtype=np.float64)
    x = float((counts > 0).sum())
    a = float(counts.sum())
    rest = work.fixed_seconds + work.per_assignment_seconds * a
    if work.overhead_seconds is not None:
        rest += overhead_lookup(work.overhead_seconds, a)
    return rest + gemm_lookup(work.gemm_seconds, x, padded_rows(counts, work.tile_rows))


# ---------------------------------------------------------------------------------------------- fitting


@dataclass(frozen=True)
class Sample:
    """One measured count vector: its counts and the measured times of the whole local expert work and of its
    two GEMMs alone."""

    counts: np.ndarray
    seconds: float
    gemm_seconds: float


def overhead_curve(points: list[tuple[int, float]]) -> np.ndarray:
    """R on the assignments grid from measured (a, seconds) points: the median at each grid point (points are
    measured at powers of two), isotonic on log2 seconds, interpolated in log-log where a point is missing and
    proportional past the last measured one."""
    if not points:
        raise ValueError("no overhead points to fit")
    by_k: dict[int, list[float]] = {}
    for a, t in points:
        by_k.setdefault(round(math.log2(max(a, 1))), []).append(max(t, 1e-7))
    ks = np.array(sorted(k for k in by_k if k < NA))
    med = np.log2([float(np.median(by_k[k])) for k in ks])
    med = isotonic(med)
    grid = np.arange(NA)
    curve = np.interp(grid, ks, med)  # flat before the first point
    past = grid > ks[-1]
    curve[past] = med[-1] + (grid[past] - ks[-1])  # proportional: one doubling of a doubles R
    return 2.0 ** curve


def fit_measured_work(measured_table: np.ndarray, samples: list[Sample],
                      overhead_points: list[tuple[int, float]]) -> ExpertWork:
    """The model of one shape from its measurements alone (fit_measured_works with one shape)."""
    return fit_measured_works([(measured_table, samples, overhead_points)])[0]


def fit_measured_works(shapes: list[tuple[np.ndarray, list[Sample], list[tuple[int, float]]]]
                       ) -> list[ExpertWork]:
    """The model of every measured shape of one backend: G from each shape's grid, R from its own points, and
    one row tile for all of them, the one whose model best predicts the whole-work times of all the shapes'
    skewed vectors (the tile is the grouped GEMM kernel's, not a shape's; chosen per shape from a few dozen
    vectors it wandered from 1 to 128 between calibrations). Nothing else is fitted, so `residuals` are the
    errors of the model on those vectors."""
    if not shapes or any(not smp for _, smp, _ in shapes):
        raise ValueError("no samples to check")
    built = [(fill_table(t), overhead_curve(pts), smp, t, pts) for t, smp, pts in shapes]

    def work(table: np.ndarray, curve: np.ndarray, smp: list[Sample], measured: np.ndarray,
             pts: list[tuple[int, float]], tile: int) -> ExpertWork:
        return ExpertWork(table, tile, 0.0, 0.0, {}, measured,
                          tuple((tuple(int(c) for c in s.counts), float(s.seconds), float(s.gemm_seconds))
                                for s in smp), curve, tuple((int(a), float(t)) for a, t in pts))

    def errors(w: ExpertWork, smp: list[Sample]) -> np.ndarray:
        return np.array([expert_seconds(s.counts, w) / s.seconds - 1 for s in smp])

    def pooled(tile: int) -> float:
        return float(np.mean(np.abs(np.concatenate([errors(work(*b, tile), b[2]) for b in built]))))

    tile = min(TILE_CANDIDATES, key=pooled)
    out = []
    for b in built:
        w = work(*b, tile)
        rel = errors(w, b[2])
        smp = b[2]
        gemm = np.array([gemm_lookup(w.gemm_seconds, float((s.counts > 0).sum()), padded_rows(s.counts, tile))
                         / s.gemm_seconds - 1 for s in smp if np.isfinite(s.gemm_seconds)])
        w.residuals.update({"vectors": float(len(smp)), "mean_abs": float(np.abs(rel).mean()),
                            "p95_abs": float(np.percentile(np.abs(rel), 95)),
                            "max_abs": float(np.abs(rel).max()), "mean_signed": float(rel.mean()),
                            "gemm_mean_abs": float(np.abs(gemm).mean()) if gemm.size else float("nan")})
        out.append(w)
    return out


def refit_work(work: ExpertWork) -> tuple[np.ndarray, list[Sample], list[tuple[int, float]]]:
    """The measurements a profile stores (grid as measured, skewed vectors, R points), to fit again with
    fit_measured_works: a profile re-fitted under a newer model without re-measuring."""
    if work.measured is None or not work.samples or not work.overhead_measured:
        raise ValueError("the profile stores no measurements to re-fit (written before they were kept)")
    samples = [Sample(np.asarray(c, dtype=np.int64), t, g) for c, t, g in work.samples]
    return work.measured, samples, list(work.overhead_measured)


# ---------------------------------------------------------------------------------------------- derivation


def roofline_table(expert_bytes: float, flops_per_row: float, flops: float, hbm: float) -> np.ndarray:
    """[NX, NW] roofline of the grouped GEMMs at the grid points: max(x weight bytes / HBM, W FLOPs /
    FLOP/s)."""
    x = grid_experts()[:, None]
    w = grid_rows()[None, :]
    return np.maximum(x * expert_bytes / hbm, w * flops_per_row / flops)


def scale_expert_work(work: ExpertWork, *, shape_ratio: float, hidden_ratio: float,
                      roofline_from: np.ndarray | None = None, roofline_to: np.ndarray | None = None,
                      hbm_ratio: float = 1.0) -> ExpertWork:
    """A measured expert model moved to another shape (shape_ratio = h f / h0 f0, hidden_ratio = h / h0) and,
    when rooflines are given, to another GPU (table x roofline_to / roofline_from; the per-assignment work,
    which is memory-bound, x hbm_ratio = HBM bandwidth measured on / HBM bandwidth of the target). R keeps its
    value at one assignment (launch latency, which neither ratio moves) and scales what grows beyond it."""
    table = work.gemm_seconds * shape_ratio
    if roofline_from is not None and roofline_to is not None:
        table = table * roofline_to / roofline_from
    table = np.maximum.accumulate(np.maximum.accumulate(table, axis=1), axis=0)
    rest = hidden_ratio * hbm_ratio
    overhead = work.overhead_seconds
    if overhead is not None:
        overhead = overhead[0] + (overhead - overhead[0]) * rest
    return ExpertWork(table, work.tile_rows, work.fixed_seconds, work.per_assignment_seconds * rest,
                      work.residuals, overhead_seconds=overhead)


def non_expert_seconds(ne: NonExpertWork, tokens: np.ndarray, context: int, layers: int,
                       dense_layers: int, prefill: np.ndarray | bool = False) -> np.ndarray:
    """Measured non-expert time of a step for each per-GPU batch in tokens [n]: layers x per-layer work at the
    context (linear in context between measured ones, extended past the last) + dense FFN layers + the LM
    head. prefill [n] (or one flag for all) picks the prefill table (causal attention over sequences of
    `context` tokens) over the decode one (each token over `context` cached keys)."""
    pre = np.broadcast_to(np.asarray(prefill, dtype=bool), np.shape(tokens))
    decode_s = _non_expert(ne, ne.layer_seconds, tokens, context, layers, dense_layers)
    if not pre.any():
        return decode_s
    return np.where(pre, _non_expert(ne, ne.prefill_layer_seconds, tokens, context, layers, dense_layers),
                    decode_s)


def _non_expert(ne: NonExpertWork, table: np.ndarray, tokens: np.ndarray, context: int, layers: int,
                dense_layers: int) -> np.ndarray:
    lt = np.log2(np.maximum(np.asarray(tokens, dtype=np.float64), 1.0))
    top = len(GRID_LOG2_TOKENS) - 1

    def curve(values: np.ndarray) -> np.ndarray:
        inside = 2.0 ** np.interp(np.minimum(lt, top), np.arange(top + 1), np.log2(values))
        return inside * np.where(lt > top, 2.0 ** (lt - top), 1.0)  # proportional past the grid

    ctx = np.asarray(ne.context_tokens, dtype=np.float64)
    per_ctx = np.stack([curve(table[i]) for i in range(len(ctx))])  # [C, n]
    if len(ctx) == 1 or context <= ctx[0]:
        layer = per_ctx[0]
    elif context >= ctx[-1]:  # attention grows with context: extend the last segment linearly
        k = len(ctx) - 1
        slope = (per_ctx[k] - per_ctx[k - 1]) / (ctx[k] - ctx[k - 1])
        layer = per_ctx[k] + np.maximum(slope, 0.0) * (context - ctx[k])
    else:
        k = int(np.searchsorted(ctx, context))
        f = (context - ctx[k - 1]) / (ctx[k] - ctx[k - 1])
        layer = (1 - f) * per_ctx[k - 1] + f * per_ctx[k]
    total = layers * layer + curve(ne.head_seconds)
    if dense_layers and ne.dense_ffn_seconds is not None:
        total = total + dense_layers * curve(ne.dense_ffn_seconds)
    return total


def tokens_grid() -> np.ndarray:
    return 2.0 ** np.asarray(GRID_LOG2_TOKENS, dtype=np.float64)
