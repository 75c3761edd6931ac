"""A lower bound on the heaviest GPU of any static placement, per layer, and each placement's gap to it.

Shape legend: L MoE layers, E experts, G GPUs, S slots per GPU, M filled slots (E + R redundant), K replica
counts considered (1..min(G, M - E + 1)).

The objective is the one `expected_gpu_load` and `imbalance` score: each expert's load split evenly over its
replicas, the heaviest GPU over the mean. Any placement of the layout (G GPUs of S slots, M of them filled,
every expert held, at most one replica of an expert per GPU) obeys, per layer:

- the mean: the heaviest GPU carries at least W / G (W the layer's summed load);
- the replicas of each expert: if expert e has k replicas, its k GPUs carry w_e plus the other items in
  their k(S - 1) remaining slots, of which at most G x S - M are empty; each other item of expert f weighs at
  least w_f / rho (rho the most replicas f can have) and the k GPUs hold at most min(k, rho) of them. So
  the heaviest of the k GPUs carries at least h_e(k) = (w_e + the lightest such fill) / k.

The bound is the least T such that some replica counts k_e >= 1, summing to M, give h_e(k_e) <= T for every
expert, and T >= W / G: a relaxation of the placement that forgets which experts share a GPU, solved exactly
as a small integer program with HiGHS (`scipy.optimize.milp`, one binary per expert and count). Its LP
relaxation alone would let counts be fractional and give a weaker bound. The HiGHS dual bound is what is
returned, so a time-limited solve still gives a valid bound.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import sparse
from scipy.optimize import Bounds, LinearConstraint, milp

from simulator.placement.core import Placement, expected_gpu_load, imbalance

# A HiGHS solve that runs this long returns its dual bound (still a valid lower bound, just less tight).
SOLVE_SECONDS = 10.0
# The returned bound is lowered by this share so that solver tolerances can never lift it above an optimum.
SAFETY = 1e-9
# Relative gap at which HiGHS stops proving; far below the gaps the bound is meant to show.
MIP_REL_GAP = 1e-7


def replica_fill_bounds(load: np.ndarray, num_gpus: int, slots_per_gpu: int, filled: int) -> np.ndarray:
    """h [E, K]: the least load of the heaviest GPU holding expert e when e has k = 1..K replicas (the module
    docstring derives it). load: [E] one layer's expert load; filled: M, the filled slots."""
    w = np.asarray(load, dtype=np.float64)
    experts = w.size
    extra = filled - experts
    max_count = min(num_gpus, extra + 1)
    empty = num_gpus * slots_per_gpu - filled
    ascending = np.sort(w, kind="mergesort")
    position = np.empty(experts, dtype=np.int64)  # where each expert sits in `ascending`
    position[np.argsort(w, kind="mergesort")] = np.arange(experts)
    prefix = np.r_[0.0, np.cumsum(ascending)]
    h = np.empty((experts, max_count))
    for k in range(1, max_count + 1):
        # after e takes k - 1 extra slots, another expert has at most rho replicas, each at least w_f / rho
        rho = max(1, min(num_gpus, extra - (k - 1) + 1))
        copies = min(k, rho)
        need = max(0, k * (slots_per_gpu - 1) - empty)  # other items the k GPUs surely hold
        full, rest = divmod(need, copies)
        full = min(full, experts - 1)  # never more than the other experts (the fill is then a lower bound)
        # the `full` lightest experts other than e, and the next one, from the sorted loads without e
        skip = position >= full  # e is not among the first `full`
        first_sum = np.where(skip, prefix[full], prefix[min(full + 1, experts)] - w)
        next_idx = np.where(position > full, full, full + 1)
        next_w = np.where(next_idx < experts, ascending[np.minimum(next_idx, experts - 1)], 0.0)
        if full >= experts - 1:
            next_w = np.zeros(experts)
        fill = (copies * first_sum + (rest * next_w if rest else 0.0)) / rho
        h[:, k - 1] = (w + fill) / k
    return h


def counts_bound(h: np.ndarray, mean: float, filled: int) -> tuple[float, np.ndarray]:
    """(T, counts): the least T >= mean for which counts k_e with h_e(k_e) <= T and sum k_e <= filled exist
    (the fewest replicas each expert needs at T), by bisection over the candidate values of h. h: [E, K]."""
    candidates = np.unique(np.r_[mean, h[h >= mean]])
    lo, hi = 0, candidates.size - 1
    while lo < hi:  # the largest candidate (every expert at its best count or below) is always feasible
        mid = (lo + hi) // 2
        fits = h <= candidates[mid]
        if fits.any(axis=1).all() and (fits.argmax(axis=1) + 1).sum() <= filled:
            hi = mid
        else:
            lo = mid + 1
    t = float(candidates[lo])
    return t, (h <= t).argmax(axis=1) + 1


def fill_exactly(h: np.ndarray, counts: np.ndarray, filled: int) -> tuple[float, np.ndarray]:
    """Counts summing to exactly `filled` from `counts` (sum <= filled): each extra replica goes where the
    bound h rises least. Returns (max_e h_e(k_e), counts): a feasible value of the count program."""
    counts = counts.copy()
    experts, max_count = h.shape
    rows = np.arange(experts)
    for _ in range(filled - int(counts.sum())):
        nxt = np.where(counts < max_count, h[rows, np.minimum(counts, max_count - 1)], np.inf)
        counts[int(np.argmin(nxt))] += 1
    return float(h[rows, counts - 1].max()), counts


def exact_counts_bound(h: np.ndarray, mean: float, filled: int, low: float, cap: float) -> float:
    """The count program with sum k_e = filled exactly, solved by HiGHS (scipy.optimize.milp): least T >=
    mean with h_e(k_e) <= T. Only pairs (e, k) with h <= cap (a feasible value) can be optimal. Returns the
    solver's dual bound (valid even if the time limit stops it), never below `low` (the relaxed optimum)."""
    experts, max_count = h.shape
    keep = h <= cap
    expert_of, count_idx = np.nonzero(keep)
    n = expert_of.size
    value = h[expert_of, count_idx]
    col = np.arange(n)
    one_count = sparse.csr_matrix((np.ones(n), (expert_of, col)), shape=(experts, n + 1))
    slots_used = sparse.csr_matrix(((count_idx + 1).astype(np.float64), (np.zeros(n), col)),
                                   shape=(1, n + 1))
    scale = 1.0 / mean  # T in units of the mean: the tolerances then mean the same on every layer
    # T - sum_k h_e(k) z_ek >= 0 for every expert
    peak = sparse.csr_matrix((np.r_[-value * scale, np.ones(experts)],
                              (np.r_[expert_of, np.arange(experts)], np.r_[col, np.full(experts, n)])),
                             shape=(experts, n + 1))
    constraints = [LinearConstraint(one_count, 1, 1), LinearConstraint(slots_used, filled, filled),
                   LinearConstraint(peak, 0, np.inf)]
    bounds = Bounds(np.r_[np.zeros(n), low * scale], np.r_[np.ones(n), cap * scale])
    res = milp(np.r_[np.zeros(n), 1.0], constraints=constraints, integrality=np.r_[np.ones(n), 0],
               bounds=bounds, options={"time_limit": SOLVE_SECONDS, "mip_rel_gap": MIP_REL_GAP})
    dual = getattr(res, "mip_dual_bound", None)
    if dual is None or not np.isfinite(dual):
        return low  # no proof came back: keep what the relaxation proved
    return max(low, float(dual) / scale)


def layer_lower_bound(load: np.ndarray, *, num_gpus: int, slots_per_gpu: int, filled: int) -> float:
    """Lower bound on the heaviest GPU's load of one layer (load [E]) for any placement of the layout."""
    w = np.asarray(load, dtype=np.float64)
    mean = w.sum() / num_gpus
    if mean <= 0:
        return 0.0
    h = replica_fill_bounds(w, num_gpus, slots_per_gpu, filled)  # [E, K]
    low, counts = counts_bound(h, mean, filled)
    cap, _ = fill_exactly(h, counts, filled)
    cap = max(cap, low)
    if cap > low * (1 + MIP_REL_GAP):  # the extra replicas cannot all go where they cost nothing
        low = exact_counts_bound(h, mean, filled, low, cap)
    return low * (1 - SAFETY)


@dataclass(frozen=True)
class LayoutBound:
    """Per layer: the lower bound on the heaviest GPU (load units) and on the imbalance (over the mean)."""

    peak: np.ndarray  # [L]
    imbalance: np.ndarray  # [L]


def lower_bound(load: np.ndarray, *, num_gpus: int, slots_per_gpu: int,
                filled: np.ndarray | int) -> LayoutBound:
    """The bound for every layer of load [L, E]; filled: M per layer ([L] or one int)."""
    load = np.asarray(load, dtype=np.float64)
    layers = load.shape[0]
    filled_per = np.broadcast_to(np.asarray(filled, dtype=np.int64), (layers,))
    peak = np.array([layer_lower_bound(load[layer], num_gpus=num_gpus, slots_per_gpu=slots_per_gpu,
                                       filled=int(filled_per[layer])) for layer in range(layers)])
    mean = load.sum(axis=1) / num_gpus
    ratio = np.divide(peak, mean, out=np.ones(layers), where=mean > 0)
    return LayoutBound(peak, np.maximum(ratio, 1.0 - SAFETY))


def placement_bound(placement: Placement, load: np.ndarray) -> LayoutBound:
    """The bound for the layout of `placement` (its GPUs, slots per GPU and filled slots per layer)."""
    filled = (placement.slots >= 0).reshape(placement.num_layers, -1).sum(axis=1)
    return lower_bound(load, num_gpus=placement.num_gpus, slots_per_gpu=placement.slots_per_gpu,
                       filled=filled)


def optimality_gap(placement: Placement, load: np.ndarray, bound: LayoutBound | None = None) -> np.ndarray:
    """[L] how far the placement's imbalance is above the bound's: imbalance / bound - 1 (0: provably
    optimal)."""
    bound = placement_bound(placement, load) if bound is None else bound
    ratio = imbalance(expected_gpu_load(placement, np.asarray(load, dtype=np.float64)))
    return ratio / bound.imbalance - 1.0
