"""Numba packing kernels behind the placement policies: plain arrays in, plain arrays out, no I/O.

Shape legend: E experts of one layer, G GPUs, S slots per GPU, M items (replicas) to pack.
"""

from __future__ import annotations

import numpy as np
from numba import njit

# The replicated policy stops adjusting replica counts once the heaviest GPU is within this share of the mean
# (0.05%: an order of magnitude below what EPLB's greedy leaves on real loads, see bench_placement).
GOOD_ENOUGH_EXCESS = 5e-4
# Local search stops once the heaviest bin is within this share of the best any packing could do.
PACKING_TOLERANCE = 1e-4


@njit(cache=True)
def replica_counts_minmax(load: np.ndarray, num_slots: int, max_per_expert: int) -> np.ndarray:
    """Replicas per expert minimising the largest load per replica (greedy; optimal for that objective).

    load: [E] float64; E <= num_slots <= E x max_per_expert (the caller checks); returns [E] int64 counts
    summing to num_slots, each <= max_per_expert.
    """
    e_count = load.shape[0]
    counts = np.ones(e_count, dtype=np.int64)
    per = load.astype(np.float64).copy()  # load per replica; only the changed expert is recomputed
    for _ in range(num_slots - e_count):
        best, best_val = -1, -1.0
        for e in range(e_count):
            if per[e] > best_val and counts[e] < max_per_expert:
                best_val = per[e]
                best = e
        counts[best] += 1
        per[best] = load[best] / counts[best]
    return counts


@njit(cache=True)
def _expert_count(bin_items: np.ndarray, fill: int, item_expert: np.ndarray, expert: int, skip: int) -> int:
    """Items of `expert` among the first `fill` items of a bin, leaving out position `skip` (-1: none)."""
    n = 0
    for q in range(fill):
        if q != skip and item_expert[bin_items[q]] == expert:
            n += 1
    return n


@njit(cache=True)
def _place_by_exchange(bins: np.ndarray, fill: np.ndarray, total: np.ndarray, weight: np.ndarray,
                       item_expert: np.ndarray, i: int, max_per_bin: int) -> bool:
    """Place item i when every bin with room already holds `max_per_bin` items of its expert.

    Some full bin c holds fewer (an expert has at most max_per_bin x bins items), and c has an item j whose
    expert the bin b with room can still take (b has fewer items than c and is saturated with i's expert): j
    moves to b, i takes j's place in c. Among all such exchanges the one with the lowest resulting peak of b
    and c is chosen. Returns False only when the caller broke the replica limit (then nothing is placed).
    """
    num_bins, capacity = bins.shape
    x = item_expert[i]
    best_peak, bb, bc, bq = np.inf, -1, -1, -1
    for b in range(num_bins):
        if fill[b] >= capacity:
            continue
        for c in range(num_bins):
            if c == b or _expert_count(bins[c], fill[c], item_expert, x, -1) >= max_per_bin:
                continue
            for q in range(fill[c]):
                j = bins[c, q]
                y = item_expert[j]
                if y == x or _expert_count(bins[b], fill[b], item_expert, y, -1) >= max_per_bin:
                    continue
                peak = max(total[b] + weight[j], total[c] - weight[j] + weight[i])
                if peak < best_peak:
                    best_peak, bb, bc, bq = peak, b, c, q
    if bb < 0:
        return False
    j = bins[bc, bq]
    bins[bc, bq] = i
    bins[bb, fill[bb]] = j
    fill[bb] += 1
    total[bb] += weight[j]
    total[bc] += weight[i] - weight[j]
    return True


@njit(cache=True)
def pack_items(weight: np.ndarray, item_expert: np.ndarray, num_bins: int, capacity: int,
               max_iters: int, max_per_bin: int) -> np.ndarray:
    """Pack weighted items into bins of `capacity` items, at most `max_per_bin` items of one expert in a bin,
    minimising the heaviest bin.

    weight: [M] float64 item weights; item_expert: [M] int64 expert of each item (replicas share an expert);
    the caller guarantees M <= num_bins x capacity and at most max_per_bin x num_bins items per expert, which
    always admits a legal packing. Returns bin_items [num_bins, capacity] int64 (item index, -1 = empty).
    Longest-processing-time first (heaviest item into the lightest bin with room that may take its expert;
    when none may, an exchange with a full bin makes room, see _place_by_exchange), then local search: move or
    swap an item of the heaviest bin with an item of another bin whenever that lowers the larger of the two
    bins.
    """
    m = weight.shape[0]
    bins = -np.ones((num_bins, capacity), dtype=np.int64)
    fill = np.zeros(num_bins, dtype=np.int64)
    total = np.zeros(num_bins, dtype=np.float64)
    order = np.argsort(-weight, kind="mergesort")
    for idx in range(m):
        i = order[idx]
        best = -1
        for b in range(num_bins):
            lighter = fill[b] < capacity and (best < 0 or total[b] < total[best])
            if lighter and _expert_count(bins[b], fill[b], item_expert, item_expert[i], -1) < max_per_bin:
                best = b
        if best < 0:
            if _place_by_exchange(bins, fill, total, weight, item_expert, i, max_per_bin):
                continue
            for b in range(num_bins):  # replica limit broken by the caller: keep every item placed regardless
                if fill[b] < capacity and (best < 0 or total[b] < total[best]):
                    best = b
        bins[best, fill[best]] = i
        fill[best] += 1
        total[best] += weight[i]
    # No packing can beat the mean bin or the heaviest item: stop within 0.01% of that bound.
    bound = max(weight.sum() / num_bins, weight.max() if m else 0.0) * (1.0 + PACKING_TOLERANCE)
    for _ in range(max_iters):
        a = np.argmax(total)
        la = total[a]
        if la <= bound:
            break
        best_peak = la * (1.0 - 1e-9)  # moves must gain something measurable
        bi, bb, bq = -1, -1, -1
        for p in range(fill[a]):
            i = bins[a, p]
            wi = weight[i]
            ei = item_expert[i]
            for b in range(num_bins):
                if b == a:
                    continue
                lb = total[b]
                if lb + wi >= best_peak and lb >= best_peak:
                    continue
                # move into a free slot
                if fill[b] < capacity and _expert_count(bins[b], fill[b], item_expert, ei, -1) < max_per_bin:
                    peak = max(la - wi, lb + wi)
                    if peak < best_peak:
                        best_peak, bi, bb, bq = peak, p, b, -1
                for q in range(fill[b]):
                    j = bins[b, q]
                    wj = weight[j]
                    if wj >= wi:
                        continue
                    peak = max(la - wi + wj, lb + wi - wj)
                    if peak >= best_peak:
                        continue
                    ej = item_expert[j]
                    if ei != ej and (_expert_count(bins[b], fill[b], item_expert, ei, q) >= max_per_bin
                                     or _expert_count(bins[a], fill[a], item_expert, ej, p) >= max_per_bin):
                        continue
                    best_peak, bi, bb, bq = peak, p, b, q
        if bi < 0:
            break
        i = bins[a, bi]
        if bq < 0:
            bins[a, bi] = bins[a, fill[a] - 1]
            bins[a, fill[a] - 1] = -1
            fill[a] -= 1
            bins[bb, fill[bb]] = i
            fill[bb] += 1
            total[a] -= weight[i]
            total[bb] += weight[i]
        else:
            j = bins[bb, bq]
            bins[a, bi] = j
            bins[bb, bq] = i
            total[a] += weight[j] - weight[i]
            total[bb] += weight[i] - weight[j]
    return bins


@njit(cache=True)
def best_replicated_layer(load: np.ndarray, num_gpus: int, slots_per_gpu: int, num_slots: int,
                          max_iters: int) -> np.ndarray:
    """One layer of the replicated policy: [G, S] expert ids (-1: empty), num_slots = E + R filled slots.

    When num_slots < G x S the G x S - num_slots empty slots go one per GPU (uneven layouts: some GPUs hold
    one slot more). Replica counts start at the min-max-per-replica greedy; then, while the packed maximum is
    more than GOOD_ENOUGH_EXCESS above the ideal (mean GPU load), a replica is moved from the expert whose
    per-replica load is lowest to the expert whose replica sits on the heaviest GPU, keeping the change only
    when the repacked maximum drops.
    """
    e_count = load.shape[0]
    m = num_slots
    empty = num_gpus * slots_per_gpu - num_slots
    counts = replica_counts_minmax(load, m, num_gpus)
    best_slots = pack_counts(load, counts, num_gpus, slots_per_gpu, empty, max_iters)
    best_peak = _peak(load, counts, best_slots)
    mean = load.sum() / num_gpus
    for _ in range(4 * (m - e_count) + 1):
        if best_peak <= mean * (1.0 + GOOD_ENOUGH_EXCESS) or m == e_count:
            break
        # heaviest GPU's heaviest replicated item gets one more replica; the least loaded per-replica expert
        # loses one
        gpu_load = np.zeros(num_gpus)
        for g in range(num_gpus):
            for s in range(slots_per_gpu):
                e = best_slots[g, s]
                if e >= 0:
                    gpu_load[g] += load[e] / counts[e]
        hot = np.argmax(gpu_load)
        improved = False
        # candidates to gain a replica: experts on the hottest GPU, heaviest per replica first
        cand = best_slots[hot].copy()
        per = np.empty(cand.shape[0])
        for s in range(cand.shape[0]):
            per[s] = -load[cand[s]] / counts[cand[s]] if cand[s] >= 0 else 0.0
        for s in np.argsort(per):
            gain = cand[s]
            if gain < 0 or counts[gain] >= num_gpus or load[gain] <= 0.0:
                continue  # a replica of an expert nobody chose cannot lower any GPU's load
            # donor: the expert with >1 replica whose load per replica after losing one is smallest
            donor, donor_val = -1, np.inf
            for e in range(e_count):
                if e != gain and counts[e] > 1:
                    v = load[e] / (counts[e] - 1)
                    if v < donor_val:
                        donor_val, donor = v, e
            if donor < 0:
                break
            counts[gain] += 1
            counts[donor] -= 1
            trial = pack_counts(load, counts, num_gpus, slots_per_gpu, empty, max_iters)
            peak = _peak(load, counts, trial)
            if peak < best_peak * (1.0 - 1e-9):
                best_peak, best_slots, improved = peak, trial, True
                break
            counts[gain] -= 1
            counts[donor] += 1
        if not improved:
            break
    return best_slots


@njit(cache=True)
def pack_counts(load: np.ndarray, counts: np.ndarray, num_gpus: int, slots_per_gpu: int, empty: int,
                max_iters: int) -> np.ndarray:
    """counts[e] replicas of each expert, each carrying load[e] / counts[e], packed one replica per GPU at
    most: [G, S] expert ids. `empty` slots (at most G) stay empty, one per GPU: they are packed as weightless
    items of one extra expert id, which the one-per-GPU rule spreads over distinct GPUs (uneven layouts)."""
    e_count = load.shape[0]
    m = counts.sum() + empty
    item_expert = np.empty(m, dtype=np.int64)
    weight = np.zeros(m)
    k = 0
    for e in range(e_count):
        for _ in range(counts[e]):
            item_expert[k] = e
            weight[k] = load[e] / counts[e]
            k += 1
    item_expert[k:] = e_count  # the empty slots' stand-in expert
    bins = pack_items(weight, item_expert, num_gpus, slots_per_gpu, max_iters, 1)
    out = -np.ones((num_gpus, slots_per_gpu), dtype=np.int64)
    for g in range(num_gpus):
        for s in range(slots_per_gpu):
            if bins[g, s] >= 0 and item_expert[bins[g, s]] < e_count:
                out[g, s] = item_expert[bins[g, s]]
    return out


@njit(cache=True)
def _peak(load: np.ndarray, counts: np.ndarray, slots: np.ndarray) -> float:
    peak = 0.0
    for g in range(slots.shape[0]):
        t = 0.0
        for s in range(slots.shape[1]):
            e = slots[g, s]
            if e >= 0:
                t += load[e] / counts[e]
        peak = max(peak, t)
    return peak


@njit(cache=True)
def coactivation_layer(slots: np.ndarray, load: np.ndarray, cosel: np.ndarray, gpus_per_node: int,
                        node_weight: float, cap: float, max_passes: int,
                        attraction: np.ndarray) -> np.ndarray:
    """Swap slots between GPUs to raise co-selected pairs sharing a GPU (weight 1) or a node (node_weight),
    plus the attraction of each replica to its GPU.

    slots: [G, S] expert ids (-1 empty); load: [E]; cosel: [E, E] tokens choosing both experts (diagonal
    ignored); attraction [E, G]: tokens that arrive on GPU g and choose e (the stay dispatch model's
    cross-layer affinity; zeros for none), worth as much as a co-selected pair's tokens. Each pass applies the
    single best swap; a swap is allowed only if both GPUs stay at or under `cap` load and no GPU holds an
    expert twice. A pair's weight is cosel[e, f] / (replicas of e x replicas of f).

    Kept incrementally so that a swap is scored in O(1) instead of by rescanning the GPU and node:
    on_gpu [E, G]: summed pair weight of e with the experts on GPU g; on_node [E, N]: the same over node n's
    GPUs; held [G, E]: 1 where GPU g holds e. A swap then updates two columns of each in O(E).
    """
    g_count, s_count = slots.shape
    e_count = load.shape[0]
    out = slots.copy()
    counts = np.zeros(e_count)
    for g in range(g_count):
        for s in range(s_count):
            if out[g, s] >= 0:
                counts[out[g, s]] += 1
    per = np.zeros(e_count)
    for e in range(e_count):
        if counts[e] > 0:
            per[e] = load[e] / counts[e]
    pair = np.zeros((e_count, e_count))  # pair weight, 0 on the diagonal and for unplaced experts
    for e in range(e_count):
        for f in range(e_count):
            if e != f and counts[e] > 0 and counts[f] > 0:
                pair[e, f] = cosel[e, f] / (counts[e] * counts[f])
    n_count = max(1, g_count // gpus_per_node)
    # one node: every pair shares it, so the node term cannot change and is left out
    node_w = node_weight if g_count > gpus_per_node else 0.0
    gpu_load = np.zeros(g_count)
    held = np.zeros((g_count, e_count), dtype=np.int64)
    on_gpu = np.zeros((e_count, g_count))
    on_node = np.zeros((e_count, n_count))
    for g in range(g_count):
        for s in range(s_count):
            f = out[g, s]
            if f < 0:
                continue
            gpu_load[g] += per[f]
            held[g, f] = 1
            for e in range(e_count):
                on_gpu[e, g] += pair[e, f]
                on_node[e, g // gpus_per_node] += pair[e, f]

    for _ in range(max_passes):
        best, bg1, bs1, bg2, bs2 = 1e-12, -1, -1, -1, -1
        for g1 in range(g_count):
            n1 = g1 // gpus_per_node
            for s1 in range(s_count):
                e1 = out[g1, s1]
                if e1 < 0:
                    continue
                here1 = on_gpu[e1, g1] + node_w * on_node[e1, n1] + attraction[e1, g1]
                for g2 in range(g1 + 1, g_count):
                    if held[g2, e1]:
                        continue
                    n2 = g2 // gpus_per_node
                    # the pair itself stops sharing GPU (and node)
                    split = 1.0 + (node_w if n1 != n2 else 0.0)
                    there1 = on_gpu[e1, g2] + node_w * on_node[e1, n2] + attraction[e1, g2]
                    for s2 in range(s_count):
                        e2 = out[g2, s2]
                        if e2 < 0 or e2 == e1 or held[g1, e2]:
                            continue
                        l1 = gpu_load[g1] - per[e1] + per[e2]
                        l2 = gpu_load[g2] - per[e2] + per[e1]
                        if l1 > cap or l2 > cap:
                            continue
                        before = here1 + on_gpu[e2, g2] + node_w * on_node[e2, n2] + attraction[e2, g2]
                        after = (there1 + on_gpu[e2, g1] + node_w * on_node[e2, n1] + attraction[e2, g1]
                                 - split * (pair[e1, e2] + pair[e2, e1]))
                        if after - before > best:
                            best, bg1, bs1, bg2, bs2 = after - before, g1, s1, g2, s2
        if bg1 < 0:
            break
        e1, e2 = out[bg1, bs1], out[bg2, bs2]
        out[bg1, bs1], out[bg2, bs2] = e2, e1
        gpu_load[bg1] += per[e2] - per[e1]
        gpu_load[bg2] += per[e1] - per[e2]
        held[bg1, e1], held[bg1, e2], held[bg2, e2], held[bg2, e1] = 0, 1, 0, 1
        n1, n2 = bg1 // gpus_per_node, bg2 // gpus_per_node
        for e in range(e_count):
            d = pair[e, e2] - pair[e, e1]  # GPU 1 traded e1 for e2, GPU 2 the reverse
            on_gpu[e, bg1] += d
            on_gpu[e, bg2] -= d
            if n1 != n2:
                on_node[e, n1] += d
                on_node[e, n2] -= d
    return out
