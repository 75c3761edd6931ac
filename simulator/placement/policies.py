"""Placement policies: pure functions from a per-layer expert load [L, E] to slots [L, G, S] (no I/O).

Shape legend: L MoE layers, E experts per layer, G GPUs, S slots per GPU, R redundant (extra) slots.
Every policy is registered in POLICIES and called through `simulator.placement.fit_placement`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from simulator.hardware import ClusterLayout
from simulator.placement.core import PlacementNotApplicable
from simulator.placement.packing import (
    best_replicated_layer,
    coactivation_layer,
    pack_counts,
    pack_items,
    replica_counts_minmax,
)
from simulator.placement.routing import RoutingSample
from simulator.placement.traffic import STEP_BUDGET, traffic_layers
from traces.errors import InputError

# Coactivation policy: a GPU may carry this much more load than the mean (or the balanced packing's own
# maximum, whichever is larger) while experts are moved next to their usual partners.
COACTIVATION_LOAD_SLACK = 0.05
# Weight of keeping a co-selected pair in one node relative to one GPU: a pair split across nodes costs
# scale-out bytes, whose bandwidth is about 9x below NVLink's (450 vs 50 GB/s per GPU on H100 nodes: NVLink4
# against one 400 Gb/s NIC; figures and sources in docs/cost-model.md, "Hardware presets").
COACTIVATION_NODE_WEIGHT = 4.0


def _check_common(load: np.ndarray, num_gpus: int, gpus_per_node: int) -> tuple[int, int]:
    if load.ndim != 2:
        raise InputError(f"placement: load must be [layers, experts], got shape {load.shape}")
    ClusterLayout(num_gpus, gpus_per_node)  # the one rule for GPUs in nodes; raises InputError
    return int(load.shape[0]), int(load.shape[1])


def slots_per_gpu(filled: int, num_gpus: int) -> int:
    """Slots per GPU for `filled` experts and replicas: ceil(filled / G). When G does not divide them, the
    first filled mod G GPUs (contiguous, round-robin) or any filled mod G GPUs (packing policies) hold one
    slot more and the others keep one empty slot, as engines lay out counts that do not divide (Qwen1.5-MoE's
    60 experts on 8)."""
    return -(-filled // num_gpus)


def contiguous(load: np.ndarray, *, num_gpus: int, gpus_per_node: int, redundant_experts: int = 0,
               coselection: np.ndarray | None = None) -> np.ndarray:
    """Experts in consecutive runs of E / G per GPU, every layer alike (uneven counts: see _uneven).

    load: [L, E] expert load (only its shape is used). Returns slots [L, G, ceil(E/G)] int32.
    """
    layers, experts = _check_common(load, num_gpus, gpus_per_node)
    one = _uneven(np.arange(experts), num_gpus)
    return np.broadcast_to(one, (layers, *one.shape)).copy()


def _uneven(order: np.ndarray, num_gpus: int) -> np.ndarray:
    """[G, ceil(E/G)] experts in `order` dealt in consecutive runs: the first E mod G GPUs hold one more (the
    others keep an empty slot, -1), as engines lay out a count that does not divide (Qwen1.5-MoE's 60 on
    8)."""
    experts = order.size
    s = slots_per_gpu(experts, num_gpus)
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
    s = slots_per_gpu(experts, num_gpus)
    flat = np.full(s * num_gpus, -1, dtype=np.int32)
    flat[:experts] = np.arange(experts)
    # GPUs past E mod G keep an empty last slot when G does not divide E
    one = flat.reshape(s, num_gpus).T.copy()
    return np.broadcast_to(one, (layers, num_gpus, s)).copy()


def balanced(load: np.ndarray, *, num_gpus: int, gpus_per_node: int, redundant_experts: int = 0,
             coselection: np.ndarray | None = None) -> np.ndarray:
    """No replicas; each GPU gets E/G experts (uneven: E mod G GPUs one more) with summed loads as even as
    possible (LPT + swap search).

    load: [L, E] expert load. Returns slots [L, G, ceil(E/G)] int32 (-1: the empty slot of a GPU holding one
    less).
    """
    layers, experts = _check_common(load, num_gpus, gpus_per_node)
    s = slots_per_gpu(experts, num_gpus)
    out = np.empty((layers, num_gpus, s), dtype=np.int32)
    ones = np.ones(experts, dtype=np.int64)
    for layer in range(layers):
        out[layer] = pack_counts(load[layer].astype(np.float64), ones, num_gpus, s, num_gpus * s - experts,
                                 64 * experts)
    return out


def _replicated_slots(experts: int, num_gpus: int, redundant: int, policy: str) -> tuple[int, int]:
    """(slots per GPU, filled slots E + R) for R redundant slots; E + R need not divide over the GPUs."""
    if redundant < 0:
        raise InputError(f"--redundant-experts must not be negative, got {redundant}")
    if redundant > experts * (num_gpus - 1):
        raise PlacementNotApplicable(
            policy, f"{redundant} redundant slots need more than one replica of an expert on some GPU "
            f"({experts} experts on {num_gpus} GPUs hold at most {experts * (num_gpus - 1)})")
    return slots_per_gpu(experts + redundant, num_gpus), experts + redundant


def replicated(load: np.ndarray, *, num_gpus: int, gpus_per_node: int, redundant_experts: int = 0,
               coselection: np.ndarray | None = None) -> np.ndarray:
    """Replicate hot experts into R extra slots and pack replicas flat over all GPUs.

    load: [L, E] expert load; redundant_experts: R, at most E x (G - 1).
    Returns slots [L, G, ceil((E + R) / G)] int32 (uneven: some GPUs keep one empty slot, -1). Replica counts
    minimise max load per replica, then are adjusted while repacking (LPT + move/swap search) lowers the
    heaviest GPU; replicas of one expert sit on different GPUs.
    """
    layers, experts = _check_common(load, num_gpus, gpus_per_node)
    s, filled = _replicated_slots(experts, num_gpus, redundant_experts, "replicated")
    out = np.empty((layers, num_gpus, s), dtype=np.int32)
    for layer in range(layers):
        out[layer] = best_replicated_layer(load[layer].astype(np.float64), num_gpus, s, filled,
                                           16 * num_gpus * s)
    return out


def replicated_hierarchical(load: np.ndarray, *, num_gpus: int, gpus_per_node: int,
                            redundant_experts: int = 0, coselection: np.ndarray | None = None) -> np.ndarray:
    """Replicated, packed in two levels: replicas onto nodes (min-max node load), then each node's onto its
    GPUs.

    load: [L, E]; returns slots [L, G, ceil((E + R) / G)] int32 (-1: empty). Same replica counts as the flat
    policy's start. Empty slots of an uneven layout are weightless items of an extra expert id, so the
    one-per-GPU rule puts at most one on each GPU.
    """
    layers, experts = _check_common(load, num_gpus, gpus_per_node)
    s, filled = _replicated_slots(experts, num_gpus, redundant_experts, "replicated-hier")
    nodes = ClusterLayout(num_gpus, gpus_per_node).num_nodes
    gpn = num_gpus // nodes
    out = np.empty((layers, num_gpus, s), dtype=np.int32)
    for layer in range(layers):
        lw = load[layer].astype(np.float64)
        counts = replica_counts_minmax(lw, filled, num_gpus)
        counts_with_empty = np.append(counts, num_gpus * s - filled)  # [E + 1]: the last id stands for empty
        item_expert = np.repeat(np.arange(experts + 1, dtype=np.int64), counts_with_empty)
        weight = np.append(lw / np.maximum(counts, 1), 0.0)[item_expert]
        # A node may hold several replicas of an expert, one per GPU at most: up to gpn per node, then the
        # per-GPU rule inside each node.
        node_bins = pack_items(weight, item_expert, nodes, gpn * s, 16 * num_gpus * s, gpn)
        for n in range(nodes):
            items = node_bins[n]
            gpu_bins = pack_items(weight[items], item_expert[items], gpn, s, 16 * gpn * s, 1)
            for g in range(gpn):
                held = item_expert[items[gpu_bins[g]]]
                out[layer, n * gpn + g] = np.where(held < experts, held, -1)
    return out


def coactivation(load: np.ndarray, *, num_gpus: int, gpus_per_node: int, redundant_experts: int = 0,
                 coselection: np.ndarray | None = None, routing: RoutingSample | None = None,
                 step_budget: float = STEP_BUDGET) -> np.ndarray:
    """Keep experts that tokens choose together on one GPU (and one node), under load caps.

    load: [L, E]; coselection: [L, E, E] tokens choosing both experts. Starts from `balanced` (or `replicated`
    when R > 0) and swaps slots between GPUs while co-selected pairs sharing a GPU (weight 1) or a node
    (weight COACTIVATION_NODE_WEIGHT) increase and every GPU stays under max(start max, mean x (1 + slack)).
    With `routing` (sampled steps of a trace), then searches swaps on the sampled tokens' unique (token, GPU)
    pairs, the all-to-all the cost model charges, within `step_budget` of the start's sampled step load
    (simulator.placement.traffic). Returns slots [L, G, S] int32.
    """
    base = _traffic_start(load, "coactivation", num_gpus=num_gpus, gpus_per_node=gpus_per_node,
                          redundant_experts=redundant_experts, coselection=coselection)
    assert coselection is not None
    if routing is not None:
        return traffic_layers(load, base, coselection, routing, gpus_per_node=gpus_per_node,
                              node_weight=COACTIVATION_NODE_WEIGHT, stay=False,
                              load_slack=COACTIVATION_LOAD_SLACK, step_budget=step_budget)
    layers, experts = load.shape
    out = np.empty_like(base)
    for layer in range(layers):
        lw = load[layer].astype(np.float64)
        slots = base[layer].astype(np.int64)
        counts = np.bincount(slots[slots >= 0], minlength=experts)
        gpu = np.array([(lw[r[r >= 0]] / counts[r[r >= 0]]).sum() for r in slots])
        cap = max(gpu.max(), lw.sum() / num_gpus * (1 + COACTIVATION_LOAD_SLACK))
        co = coselection[layer].astype(np.float64)
        out[layer] = coactivation_layer(slots, lw, co, gpus_per_node, COACTIVATION_NODE_WEIGHT, cap,
                                         4 * experts, np.zeros((experts, num_gpus)))
    return out


def affinity(load: np.ndarray, *, num_gpus: int, gpus_per_node: int, redundant_experts: int = 0,
             coselection: np.ndarray | None = None, routing: RoutingSample | None = None,
             step_budget: float = STEP_BUDGET) -> np.ndarray:
    """Cross-layer affinity for the stay dispatch model (a token stays on the GPU of its last top-1 expert
    instead of returning home, as ExFlow assumes): coactivation whose swaps also pull each expert of layer
    l + 1 toward the GPUs that tokens choosing it arrive from (co-selection between consecutive layers,
    counted over the fit part), then the token-level search with each token's source where its previous
    layer's top-1 expert ran. Layers are fitted in order, each on the one before. Needs a trace's routing
    (`routing`). Returns slots [L, G, S] int32.
    """
    base = _traffic_start(load, "affinity", num_gpus=num_gpus, gpus_per_node=gpus_per_node,
                          redundant_experts=redundant_experts, coselection=coselection)
    if routing is None:
        raise PlacementNotApplicable("affinity",
                                     "needs a trace's routing (steps and cross-layer co-selection)")
    assert coselection is not None
    return traffic_layers(load, base, coselection, routing, gpus_per_node=gpus_per_node,
                          node_weight=COACTIVATION_NODE_WEIGHT, stay=True, load_slack=COACTIVATION_LOAD_SLACK,
                          step_budget=step_budget)


def _traffic_start(load: np.ndarray, policy: str, *, num_gpus: int, gpus_per_node: int,
                   redundant_experts: int, coselection: np.ndarray | None) -> np.ndarray:
    """The packing a traffic-aware policy starts from: balanced, or replicated with redundant slots."""
    layers, experts = _check_common(load, num_gpus, gpus_per_node)
    if coselection is None or coselection.shape != (layers, experts, experts):
        raise PlacementNotApplicable(policy, "needs co-selection counts [layers, experts, experts]")
    base_policy = replicated if redundant_experts else balanced
    return base_policy(load, num_gpus=num_gpus, gpus_per_node=gpus_per_node,
                       redundant_experts=redundant_experts)


@dataclass(frozen=True)
class Redundancy:
    """A number of redundant slots R and, when it is not the one asked for, why (for the command's output)."""

    redundant_experts: int
    note: str | None = None


def default_redundant_experts(num_experts: int, num_gpus: int) -> Redundancy:
    """The default redundancy: one extra slot per GPU (R = G), as engines with redundant experts provision.

    When E + G does not divide over the G GPUs (E mod G != 0), R is rounded to the nearest value that does
    (G - E mod G or 2G - E mod G; a tie goes up), so every GPU holds the same number of slots, and the note
    says so.
    """
    if num_experts < 1:
        raise InputError(f"placement: need at least one expert, got {num_experts}")
    if num_gpus < 1:
        raise InputError(f"--gpus must be at least 1, got {num_gpus}")
    rest = num_experts % num_gpus
    if rest == 0:
        return Redundancy(num_gpus)
    down, up = num_gpus - rest, 2 * num_gpus - rest
    r = down if num_gpus - down < up - num_gpus else up
    note = (f"default redundancy rounded from {num_gpus} (one per GPU) to {r}: {num_experts} experts + {r} = "
            f"{num_experts + r} slots, {(num_experts + r) // num_gpus} per GPU")
    return Redundancy(r, note)


PolicyFn = Callable[..., np.ndarray]
POLICIES: dict[str, PolicyFn] = {
    "contiguous": contiguous,
    "round-robin": round_robin,
    "balanced": balanced,
    "replicated": replicated,
    "replicated-hier": replicated_hierarchical,
    "coactivation": coactivation,
    "affinity": affinity,
}
NEEDS_COSELECTION = frozenset({"coactivation", "affinity"})
# fitted on a trace's routing sample too (fit_placement passes `routing` and `step_budget` to these only)
TRAFFIC_AWARE = frozenset({"coactivation", "affinity"})
USES_REDUNDANCY = frozenset({"replicated", "replicated-hier", "coactivation", "affinity"})
