"""Expert placement policies: pure functions from a per-layer expert load to physical slots on GPUs.

Shape legend: L MoE layers, E experts per layer, G GPUs, S slots per GPU, N nodes, M = G*S physical slots.

A placement is `slots [L, G, S]`: the expert id held by each physical slot (-1: empty). An expert may be held by
several slots (replicas); a GPU never holds two replicas of one expert. Every policy is registered in POLICIES and
called through `fit_placement`. The packing kernels are Numba functions over plain arrays (no I/O).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from numba import njit

from traces.errors import InputError

# The replicated policy stops adjusting replica counts once the heaviest GPU is within this share of the mean
# (0.05%: an order of magnitude below what EPLB's greedy leaves on real loads, anchors.md).
GOOD_ENOUGH_EXCESS = 5e-4
# Local search stops once the heaviest bin is within this share of the best any packing could do.
PACKING_TOLERANCE = 1e-4
# Coactivation policy: a GPU may carry this much more load than the mean (or the balanced packing's own maximum,
# whichever is larger) while experts are moved next to their usual partners.
COACTIVATION_LOAD_SLACK = 0.05
# Weight of keeping a co-selected pair in one node relative to one GPU: a pair split across nodes costs scale-out
# bytes, whose bandwidth is about 9x below NVLink's (450 vs 50 GB/s per GPU on H100 nodes: NVLink4 against one 400 Gb/s NIC).
COACTIVATION_NODE_WEIGHT = 4.0


@dataclass(frozen=True)
class Placement:
    """Expert ids per physical slot, per layer.

    slots: [L, G, S] int32, expert id held by each slot of each GPU (-1 = empty slot).
    """

    policy: str
    slots: np.ndarray
    num_experts: int
    gpus_per_node: int
    model_id: str | None = None  # set when a placement file names the model it was made for

    def __post_init__(self) -> None:
        if self.slots.ndim != 3:
            raise InputError(f"placement {self.policy}: slots must be [layers, gpus, slots], got shape {self.slots.shape}")
        object.__setattr__(self, "slots", np.ascontiguousarray(self.slots, dtype=np.int32))
        check_slots(self.slots, self.num_experts, self.policy)
        g = self.num_gpus
        if g % self.gpus_per_node and g > self.gpus_per_node:
            raise InputError(f"placement {self.policy}: {g} GPUs are not divisible into nodes of {self.gpus_per_node}")

    @property
    def num_layers(self) -> int:
        return int(self.slots.shape[0])

    @property
    def num_gpus(self) -> int:
        return int(self.slots.shape[1])

    @property
    def slots_per_gpu(self) -> int:
        return int(self.slots.shape[2])

    @property
    def num_nodes(self) -> int:
        return max(1, self.num_gpus // self.gpus_per_node)

    @property
    def replica_counts(self) -> np.ndarray:
        """[L, E] number of slots holding each expert."""
        out = np.zeros((self.num_layers, self.num_experts), dtype=np.int64)
        for layer in range(self.num_layers):
            ids = self.slots[layer].ravel()
            np.add.at(out[layer], ids[ids >= 0], 1)
        return out

    @property
    def max_experts_per_gpu(self) -> int:
        """Most filled slots on any GPU in any layer (expert weight memory is sized by this)."""
        return int((self.slots >= 0).sum(axis=2).max())

    def to_dict(self) -> dict[str, Any]:
        return {
            "policy": self.policy,
            "model_id": self.model_id,
            "num_experts": self.num_experts,
            "gpus_per_node": self.gpus_per_node,
            "layers": self.slots.tolist(),
        }


def check_slots(slots: np.ndarray, num_experts: int, source: str) -> None:
    """Every expert held at least once per layer, ids in range, no expert twice on one GPU. slots: [L, G, S]."""
    if slots.size == 0:
        raise InputError(f"{source}: placement has no slots")
    if slots.min() < -1 or slots.max() >= num_experts:
        raise InputError(f"{source}: expert id out of range 0..{num_experts - 1}")
    layers = slots.shape[0]
    flat = slots.reshape(layers, -1)
    held = np.zeros((layers, num_experts + 1), dtype=np.int64)  # column num_experts collects empty slots
    rows = np.repeat(np.arange(layers), flat.shape[1])
    np.add.at(held, (rows, np.where(flat >= 0, flat, num_experts).ravel()), 1)
    missing_layer, missing_expert = np.nonzero(held[:, :num_experts] == 0)
    if missing_layer.size:
        layer = int(missing_layer[0])
        ids = missing_expert[missing_layer == layer][:8]
        raise InputError(f"{source}: layer {layer} misses expert(s) {', '.join(map(str, ids))}")
    ordered = np.sort(slots, axis=2)
    twice = (ordered[:, :, 1:] == ordered[:, :, :-1]) & (ordered[:, :, 1:] >= 0)
    if twice.any():
        layer, gpu, _ = np.argwhere(twice)[0]
        raise InputError(f"{source}: layer {layer} GPU {gpu} holds the same expert twice")


# ---------------------------------------------------------------------------------------------- kernels


@njit(cache=True)
def replica_counts_minmax(load: np.ndarray, num_slots: int, max_per_expert: int) -> np.ndarray:
    """Replicas per expert minimising the largest load per replica (greedy; optimal for that objective).

    load: [E] float64; num_slots >= E; returns [E] int64 counts summing to num_slots, each <= max_per_expert.
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

    Some full bin c holds fewer (an expert has at most max_per_bin x bins items), and c has an item j whose expert
    the bin b with room can still take (b has fewer items than c and is saturated with i's expert): j moves to b, i
    takes j's place in c. Among all such exchanges the one with the lowest resulting peak of b and c is chosen.
    Returns False only when the caller broke the replica limit (then nothing is placed).
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

    weight: [M] float64 item weights; item_expert: [M] int64 expert of each item (replicas share an expert); the
    caller guarantees M <= num_bins x capacity and at most max_per_bin x num_bins items per expert, which always
    admits a legal packing. Returns bin_items [num_bins, capacity] int64 (item index, -1 = empty).
    Longest-processing-time first (heaviest item into the lightest bin with room that may take its expert; when
    none may, an exchange with a full bin makes room, see _place_by_exchange), then local search: move or swap an
    item of the heaviest bin with an item of another bin whenever that lowers the larger of the two bins.
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
def _best_replicated_layer(load: np.ndarray, num_gpus: int, slots_per_gpu: int, max_iters: int) -> np.ndarray:
    """One layer of the replicated policy: [G, S] expert ids.

    Replica counts start at the min-max-per-replica greedy; then, while the packed maximum is more than
    GOOD_ENOUGH_EXCESS above the ideal (mean GPU load), a replica is moved from the expert whose per-replica load is lowest to the expert whose replica
    sits on the heaviest GPU, keeping the change only when the repacked maximum drops.
    """
    e_count = load.shape[0]
    m = num_gpus * slots_per_gpu
    counts = replica_counts_minmax(load, m, num_gpus)
    best_slots = _pack_counts(load, counts, num_gpus, slots_per_gpu, max_iters)
    best_peak = _peak(load, counts, best_slots)
    mean = load.sum() / num_gpus
    for _ in range(4 * (m - e_count) + 1):
        if best_peak <= mean * (1.0 + GOOD_ENOUGH_EXCESS) or m == e_count:
            break
        # heaviest GPU's heaviest replicated item gets one more replica; the least loaded per-replica expert loses one
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
            trial = _pack_counts(load, counts, num_gpus, slots_per_gpu, max_iters)
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
def _pack_counts(load: np.ndarray, counts: np.ndarray, num_gpus: int, slots_per_gpu: int,
                 max_iters: int) -> np.ndarray:
    m = counts.sum()
    item_expert = np.empty(m, dtype=np.int64)
    weight = np.empty(m)
    k = 0
    for e in range(load.shape[0]):
        for _ in range(counts[e]):
            item_expert[k] = e
            weight[k] = load[e] / counts[e]
            k += 1
    bins = pack_items(weight, item_expert, num_gpus, slots_per_gpu, max_iters, 1)
    out = -np.ones((num_gpus, slots_per_gpu), dtype=np.int64)
    for g in range(num_gpus):
        for s in range(slots_per_gpu):
            if bins[g, s] >= 0:
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
def _coactivation_layer(slots: np.ndarray, load: np.ndarray, cosel: np.ndarray, gpus_per_node: int,
                        node_weight: float, cap: float, max_passes: int) -> np.ndarray:
    """Swap slots between GPUs to raise co-selected pairs sharing a GPU (weight 1) or a node (node_weight).

    slots: [G, S] expert ids (-1 empty); load: [E]; cosel: [E, E] tokens choosing both experts (diagonal ignored).
    Each pass applies the single best swap; a swap is allowed only if both GPUs stay at or under `cap` load and no
    GPU holds an expert twice. A pair's weight is cosel[e, f] / (replicas of e x replicas of f).

    Kept incrementally so that a swap is scored in O(1) instead of by rescanning the GPU and node:
    on_gpu [E, G]: summed pair weight of e with the experts on GPU g; on_node [E, N]: the same over node n's GPUs;
    held [G, E]: 1 where GPU g holds e. A swap then updates two columns of each in O(E).
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
                here1 = on_gpu[e1, g1] + node_w * on_node[e1, n1]
                for g2 in range(g1 + 1, g_count):
                    if held[g2, e1]:
                        continue
                    n2 = g2 // gpus_per_node
                    split = 1.0 + (node_w if n1 != n2 else 0.0)  # the pair itself stops sharing GPU (and node)
                    there1 = on_gpu[e1, g2] + node_w * on_node[e1, n2]
                    for s2 in range(s_count):
                        e2 = out[g2, s2]
                        if e2 < 0 or e2 == e1 or held[g1, e2]:
                            continue
                        l1 = gpu_load[g1] - per[e1] + per[e2]
                        l2 = gpu_load[g2] - per[e2] + per[e1]
                        if l1 > cap or l2 > cap:
                            continue
                        before = here1 + on_gpu[e2, g2] + node_w * on_node[e2, n2]
                        after = there1 + on_gpu[e2, g1] + node_w * on_node[e2, n1] - split * (pair[e1, e2] + pair[e2, e1])
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


# ---------------------------------------------------------------------------------------------- policies


def _check_common(load: np.ndarray, num_gpus: int, gpus_per_node: int) -> tuple[int, int]:
    if load.ndim != 2:
        raise InputError(f"placement: load must be [layers, experts], got shape {load.shape}")
    if num_gpus < 1 or gpus_per_node < 1:
        raise InputError("placement: --gpus and --gpus-per-node must be positive")
    if num_gpus % gpus_per_node and num_gpus > gpus_per_node:
        raise InputError(f"--gpus {num_gpus} is not divisible into nodes of --gpus-per-node {gpus_per_node}")
    return int(load.shape[0]), int(load.shape[1])


def _slots_without_replicas(num_experts: int, num_gpus: int, policy: str) -> int:
    if num_experts % num_gpus:
        raise InputError(
            f"--placements {policy}: {num_experts} experts do not divide over {num_gpus} GPUs without replicas "
            "(use --redundant-experts with the replicated policy, or another GPU count)"
        )
    return num_experts // num_gpus


def contiguous(load: np.ndarray, *, num_gpus: int, gpus_per_node: int, redundant_experts: int = 0,
               coselection: np.ndarray | None = None) -> np.ndarray:
    """Experts in consecutive runs of E / G per GPU, every layer alike (uneven counts: see _uneven).

    load: [L, E] expert load (only its shape is used). Returns slots [L, G, ceil(E/G)] int32.
    """
    layers, experts = _check_common(load, num_gpus, gpus_per_node)
    return np.broadcast_to(_uneven(np.arange(experts), num_gpus), (layers, num_gpus, -(-experts // num_gpus))).copy()


def _uneven(order: np.ndarray, num_gpus: int) -> np.ndarray:
    """[G, ceil(E/G)] experts in `order` dealt in consecutive runs: the first E mod G GPUs hold one more (the
    others keep an empty slot, -1), as engines lay out a count that does not divide (Qwen1.5-MoE's 60 on 8)."""
    experts = order.size
    s = -(-experts // num_gpus)
    out = np.full((num_gpus, s), -1, dtype=np.int32)
    sizes = np.full(num_gpus, experts // num_gpus)
    sizes[: experts % num_gpus] += 1
    start = 0
    for g in range(num_gpus):
        out[g, : sizes[g]] = order[start: start + sizes[g]]
        start += sizes[g]
    return out


def round_robin(load: np.ndarray, *, num_gpus: int, gpus_per_node: int, redundant_experts: int = 0,
                coselection: np.ndarray | None = None) -> np.ndarray:
    """Expert e on GPU e mod G, every layer alike.

    load: [L, E] expert load (only its shape is used). Returns slots [L, G, ceil(E/G)] int32.
    """
    layers, experts = _check_common(load, num_gpus, gpus_per_node)
    s = -(-experts // num_gpus)
    flat = np.full(s * num_gpus, -1, dtype=np.int32)
    flat[:experts] = np.arange(experts)
    one = flat.reshape(s, num_gpus).T.copy()  # GPUs past E mod G keep an empty last slot when G does not divide E
    return np.broadcast_to(one, (layers, num_gpus, s)).copy()


def balanced(load: np.ndarray, *, num_gpus: int, gpus_per_node: int, redundant_experts: int = 0,
             coselection: np.ndarray | None = None) -> np.ndarray:
    """No replicas; each GPU gets E/G experts with summed loads as even as possible (LPT + swap search).

    load: [L, E] expert load. Returns slots [L, G, E/G] int32.
    """
    layers, experts = _check_common(load, num_gpus, gpus_per_node)
    s = _slots_without_replicas(experts, num_gpus, "balanced")
    out = np.empty((layers, num_gpus, s), dtype=np.int32)
    item_expert = np.arange(experts, dtype=np.int64)
    for layer in range(layers):
        bins = pack_items(load[layer].astype(np.float64), item_expert, num_gpus, s, 64 * experts, 1)
        out[layer] = bins
    return out


def _replicated_slots(experts: int, num_gpus: int, redundant: int) -> int:
    if redundant < 0:
        raise InputError(f"--redundant-experts must not be negative, got {redundant}")
    total = experts + redundant
    if total % num_gpus:
        raise InputError(
            f"--redundant-experts {redundant}: {experts} experts + {redundant} replicas = {total} slots do not "
            f"divide over {num_gpus} GPUs"
        )
    return total // num_gpus


def replicated(load: np.ndarray, *, num_gpus: int, gpus_per_node: int, redundant_experts: int = 0,
               coselection: np.ndarray | None = None) -> np.ndarray:
    """Replicate hot experts into R extra slots and pack replicas flat over all GPUs.

    load: [L, E] expert load; redundant_experts: R, with (E + R) divisible by G.
    Returns slots [L, G, (E + R) / G] int32. Replica counts minimise max load per replica, then are adjusted
    while repacking (LPT + move/swap search) lowers the heaviest GPU; replicas of one expert sit on different GPUs.
    """
    layers, experts = _check_common(load, num_gpus, gpus_per_node)
    s = _replicated_slots(experts, num_gpus, redundant_experts)
    out = np.empty((layers, num_gpus, s), dtype=np.int32)
    for layer in range(layers):
        out[layer] = _best_replicated_layer(load[layer].astype(np.float64), num_gpus, s, 16 * num_gpus * s)
    return out


def replicated_hierarchical(load: np.ndarray, *, num_gpus: int, gpus_per_node: int, redundant_experts: int = 0,
                            coselection: np.ndarray | None = None) -> np.ndarray:
    """Replicated, packed in two levels: replicas onto nodes (min-max node load), then each node's onto its GPUs.

    load: [L, E]; returns slots [L, G, (E + R) / G] int32. Same replica counts as the flat policy's start.
    """
    layers, experts = _check_common(load, num_gpus, gpus_per_node)
    s = _replicated_slots(experts, num_gpus, redundant_experts)
    nodes = max(1, num_gpus // gpus_per_node)
    gpn = num_gpus // nodes
    out = np.empty((layers, num_gpus, s), dtype=np.int32)
    for layer in range(layers):
        lw = load[layer].astype(np.float64)
        counts = replica_counts_minmax(lw, num_gpus * s, num_gpus)
        item_expert = np.repeat(np.arange(experts, dtype=np.int64), counts)
        weight = lw[item_expert] / counts[item_expert]
        # A node may hold several replicas of an expert, one per GPU at most: up to gpn per node, then the per-GPU
        # rule inside each node.
        node_bins = pack_items(weight, item_expert, nodes, gpn * s, 16 * num_gpus * s, gpn)
        for n in range(nodes):
            items = node_bins[n]
            gpu_bins = pack_items(weight[items], item_expert[items], gpn, s, 16 * gpn * s, 1)
            for g in range(gpn):
                out[layer, n * gpn + g] = item_expert[items[gpu_bins[g]]]
    return out


def coactivation(load: np.ndarray, *, num_gpus: int, gpus_per_node: int, redundant_experts: int = 0,
                 coselection: np.ndarray | None = None) -> np.ndarray:
    """Keep experts that tokens choose together on one GPU (and one node), under a load cap.

    load: [L, E]; coselection: [L, E, E] tokens choosing both experts. Starts from `balanced` (or `replicated`
    when R > 0) and swaps slots between GPUs while co-selected pairs sharing a GPU (weight 1) or a node
    (weight COACTIVATION_NODE_WEIGHT) increase and every GPU stays under max(start max, mean x (1 + slack)).
    Returns slots [L, G, S] int32.
    """
    layers, experts = _check_common(load, num_gpus, gpus_per_node)
    if coselection is None or coselection.shape != (layers, experts, experts):
        raise InputError("placement coactivation: needs co-selection counts [layers, experts, experts]")
    base_policy = replicated if redundant_experts else balanced
    base = base_policy(load, num_gpus=num_gpus, gpus_per_node=gpus_per_node, redundant_experts=redundant_experts)
    out = np.empty_like(base)
    for layer in range(layers):
        lw = load[layer].astype(np.float64)
        slots = base[layer].astype(np.int64)
        counts = np.bincount(slots[slots >= 0], minlength=experts)
        gpu = np.array([(lw[r[r >= 0]] / counts[r[r >= 0]]).sum() for r in slots])
        cap = max(gpu.max(), lw.sum() / num_gpus * (1 + COACTIVATION_LOAD_SLACK))
        co = coselection[layer].astype(np.float64)
        out[layer] = _coactivation_layer(slots, lw, co, gpus_per_node, COACTIVATION_NODE_WEIGHT, cap,
                                         4 * experts)
    return out


PolicyFn = Callable[..., np.ndarray]
POLICIES: dict[str, PolicyFn] = {
    "contiguous": contiguous,
    "round-robin": round_robin,
    "balanced": balanced,
    "replicated": replicated,
    "replicated-hier": replicated_hierarchical,
    "coactivation": coactivation,
}
NEEDS_COSELECTION = frozenset({"coactivation"})
USES_REDUNDANCY = frozenset({"replicated", "replicated-hier", "coactivation"})


def fit_placement(policy: str, load: np.ndarray, *, num_gpus: int, gpus_per_node: int, redundant_experts: int = 0,
                  coselection: np.ndarray | None = None) -> Placement:
    """Fit a named policy (or `file:PATH`) to a load [L, E]; coselection [L, E, E] for coactivation."""
    load = np.asarray(load, dtype=np.float64)
    if policy.startswith("file:"):
        placement = load_placement_file(policy[5:], num_experts=load.shape[1], num_layers=load.shape[0])
        if placement.num_gpus != num_gpus:
            raise InputError(f"{policy[5:]}: placement is for {placement.num_gpus} GPUs, not --gpus {num_gpus}")
        return Placement(policy, placement.slots, placement.num_experts, gpus_per_node, placement.model_id)
    if policy not in POLICIES:
        raise InputError(f"--placements: unknown policy {policy!r}; choose from {', '.join(POLICIES)} or file:PATH")
    if redundant_experts and policy not in USES_REDUNDANCY:
        redundant_experts = 0
    slots = POLICIES[policy](load, num_gpus=num_gpus, gpus_per_node=gpus_per_node,
                             redundant_experts=redundant_experts, coselection=coselection)
    return Placement(policy, slots, int(load.shape[1]), gpus_per_node)


def load_placement_file(path: str | Path, *, num_experts: int, num_layers: int) -> Placement:
    """Read a placement JSON: {"num_experts": E, "gpus_per_node": n, "model_id": str, "layers": [[[ids]...]...]}.

    Only "layers" is required; "model_id", when present, must match the trace's (checked by the replay).

    "layers" is [L][G][S] (pad short GPUs with -1), or a single [G][S] used for every layer.
    """
    p = Path(path)
    if not p.exists():
        raise InputError(f"{p}: placement file not found")
    try:
        data = json.loads(p.read_text())
    except (ValueError, UnicodeDecodeError) as exc:
        raise InputError(f"{p}: placement file is not valid JSON ({exc})") from exc
    if not isinstance(data, dict) or "layers" not in data:
        raise InputError(f"{p}: placement file needs a \"layers\" list ([layers][gpus][slots] expert ids)")
    file_experts = data.get("num_experts", num_experts)
    if file_experts != num_experts:
        raise InputError(f"{p}: placement is for {file_experts} experts but the trace has {num_experts}")
    try:
        arr = np.array(data["layers"], dtype=np.int64)
    except (ValueError, TypeError) as exc:
        raise InputError(f"{p}: \"layers\" must be a rectangular list of integers (pad with -1)") from exc
    if arr.ndim == 2:
        arr = np.broadcast_to(arr, (num_layers, *arr.shape)).copy()
    if arr.ndim != 3:
        raise InputError(f"{p}: \"layers\" must be [layers][gpus][slots], got {arr.ndim} dimensions")
    if arr.shape[0] != num_layers:
        raise InputError(f"{p}: placement has {arr.shape[0]} layers but the trace has {num_layers}")
    gpn_raw = data.get("gpus_per_node", arr.shape[1])
    if not isinstance(gpn_raw, int) or gpn_raw < 1:
        raise InputError(f"{p}: \"gpus_per_node\" must be a positive integer")
    gpn = gpn_raw
    model_id = data.get("model_id")
    return Placement(f"file:{p}", arr.astype(np.int32), num_experts, gpn,
                     str(model_id) if model_id is not None else None)


def expected_gpu_load(placement: Placement, load: np.ndarray) -> np.ndarray:
    """[L, G] load per GPU when each expert's load [L, E] is split evenly among its replicas."""
    counts = placement.replica_counts.astype(np.float64)
    per = np.divide(load, counts, out=np.zeros_like(load, dtype=np.float64), where=counts > 0)  # [L, E]
    slots = placement.slots  # [L, G, S]
    layer_idx = np.arange(placement.num_layers)[:, None, None]
    vals = np.where(slots >= 0, per[layer_idx, np.maximum(slots, 0)], 0.0)
    return vals.sum(axis=2)


def imbalance(gpu_load: np.ndarray) -> np.ndarray:
    """max / mean over the last axis (GPUs); 1.0 is perfect balance. Rows with zero load give 1.0."""
    mean = gpu_load.mean(axis=-1)
    peak = gpu_load.max(axis=-1)
    return np.divide(peak, mean, out=np.ones_like(mean, dtype=np.float64), where=mean > 0)
