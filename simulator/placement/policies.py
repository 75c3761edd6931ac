"""Placement policies: pure functions from a per-layer expert load [L, E] to slots [L, G, S] (no I/O).

Shape legend: L MoE layers, E experts per layer, G GPUs, S slots per GPU, R redundant (extra) slots.
Every policy is registered in POLICIES and called through `simulator.placement.fit_placement`.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from simulator.hardware import ClusterLayout
from simulator.placement.packing import (
    best_replicated_layer,
    coactivation_layer,
    pack_items,
    replica_counts_minmax,
)
from traces.errors import InputError

# Coactivation policy: a GPU may carry this much more load than the mean (or the balanced packing's own maximum,
# whichever is larger) while experts are moved next to their usual partners.
COACTIVATION_LOAD_SLACK = 0.05
# Weight of keeping a co-selected pair in one node relative to one GPU: a pair split across nodes costs scale-out
# bytes, whose bandwidth is about 9x below NVLink's (450 vs 50 GB/s per GPU on H100 nodes: NVLink4 against one
# 400 Gb/s NIC; figures and sources in docs/cost-model.md, "Hardware presets").
COACTIVATION_NODE_WEIGHT = 4.0


def _check_common(load: np.ndarray, num_gpus: int, gpus_per_node: int) -> tuple[int, int]:
    if load.ndim != 2:
        raise InputError(f"placement: load must be [layers, experts], got shape {load.shape}")
    ClusterLayout(num_gpus, gpus_per_node)  # the one rule for GPUs in nodes; raises InputError
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
        out[layer] = best_replicated_layer(load[layer].astype(np.float64), num_gpus, s, 16 * num_gpus * s)
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
        out[layer] = coactivation_layer(slots, lw, co, gpus_per_node, COACTIVATION_NODE_WEIGHT, cap,
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
