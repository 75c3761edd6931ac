"""Scoring a placement on per-step loads, and what a refit moves (pure functions).

Shape legend: W steps, L MoE layers, E experts, G GPUs, S slots per GPU. slots: [L, G, S] expert id per slot,
-1 empty.
"""

from __future__ import annotations

import numpy as np

from simulator import metrics


def gpu_share(slots: np.ndarray, num_experts: int) -> np.ndarray:
    """[L, E, G] fraction of each expert's load that lands on each GPU (even split over replicas).

    slots: [L, G, S] expert id per slot (-1 empty).
    """
    L, G, S = slots.shape
    held = np.zeros((L, E := num_experts, G), dtype=np.float64)
    layer = np.broadcast_to(np.arange(L)[:, None, None], slots.shape)
    gpu = np.broadcast_to(np.arange(G)[None, :, None], slots.shape)
    used = slots >= 0
    np.add.at(held, (layer[used], slots[used], gpu[used]), 1.0)
    replicas = held.sum(axis=2, keepdims=True)  # [L, E, 1]
    return np.divide(held, replicas, out=np.zeros((L, E, G)), where=replicas > 0)


def step_peaks_means(loads: np.ndarray, share: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per step: sum over layers of the busiest GPU's load, and sum over layers of the mean GPU load.

    loads: [W, L, E]; share: [L, E, G]. Returns two [W] float64 arrays; their ratio is the step's imbalance.
    """
    peaks, means, *_ = score_steps(loads, share)
    return peaks, means


def score_steps(loads: np.ndarray, share: np.ndarray, seconds_per_assignment: float = 1.0,
                seconds_per_expert_read: float = 0.0) -> tuple[np.ndarray, ...]:
    """step_peaks_means; each GPU's load summed over the steps [L, G] (for the aggregate imbalance); each
    step's roofline expert time [W]: per layer the slowest GPU's max(load x seconds_per_assignment, experts
    with work x seconds_per_expert_read), summed over layers (result.RefitPrices); and each step's sum over
    layers of SGLang's balancedness [W] (simulator.metrics)."""
    per_layer = loads.astype(np.float64).transpose(1, 0, 2)  # [L, W, E]
    gpu = np.matmul(per_layer, share)  # [L, W, G]
    seconds = gpu * seconds_per_assignment
    if seconds_per_expert_read > 0:
        active = np.matmul((per_layer > 0).astype(np.float64), (share > 0).astype(np.float64))  # [L, W, G]
        seconds = np.maximum(seconds, active * seconds_per_expert_read)
    peak, mean = gpu.max(axis=2), gpu.mean(axis=2)  # [L, W]
    return (peak.sum(axis=0), mean.sum(axis=0), gpu.sum(axis=1), seconds.max(axis=2).sum(axis=0),
            metrics.sglang_layer_balancedness(mean, peak).sum(axis=0))


def presence(slots: np.ndarray, num_experts: int) -> np.ndarray:
    """[L, G, E] whether each GPU holds each expert. slots: [L, G, S]."""
    out = np.zeros((*slots.shape[:2], num_experts + 1), dtype=bool)  # last column collects empty slots
    np.put_along_axis(out, np.where(slots >= 0, slots, num_experts), True, axis=2)
    return out[..., :num_experts]


def copies_received(old: np.ndarray, new: np.ndarray, num_experts: int) -> np.ndarray:
    """[G] (layer, expert) copies each GPU holds in `new` but not in `old`: the weights it receives when
    switching."""
    return (presence(new, num_experts) & ~presence(old, num_experts)).sum(axis=(0, 2))


def copies_moved(old: np.ndarray, new: np.ndarray, num_experts: int) -> int:
    """(layer, GPU, expert) copies held by `new` but not by `old`: weights to send when switching. slots [L,
    G, S]."""
    return int(copies_received(old, new, num_experts).sum())


def align_gpus(old: np.ndarray, new: np.ndarray, num_experts: int, gpus_per_node: int) -> np.ndarray:
    """`new` with its GPUs renumbered to keep as many experts as possible where `old` has them.

    A policy refitted from scratch may put the same groups of experts on differently numbered GPUs;
    renumbering changes no GPU's load, only how many weights must move. Nodes are matched as wholes first,
    then GPUs inside each matched pair of nodes, so a placement's node grouping survives. Both matchings
    maximise shared experts (linear assignment). old, new: [L, G, S] -> [L, G, S].
    """
    from scipy.optimize import linear_sum_assignment

    L, G, _ = new.shape
    nodes = max(1, G // gpus_per_node) if G % gpus_per_node == 0 else 1
    gpn = G // nodes
    # [L, G old, G new] experts in common; float32 so that BLAS does it (exact: counts stay far below 2**24)
    shared = np.matmul(presence(old, num_experts).astype(np.float32),
                       presence(new, num_experts).astype(np.float32).transpose(0, 2, 1))
    out = np.empty_like(new)
    for layer in range(L):
        by_node = shared[layer].reshape(nodes, gpn, nodes, gpn).sum(axis=(1, 3))
        for n_old, n_new in zip(*linear_sum_assignment(by_node, maximize=True), strict=True):
            block = shared[layer, n_old * gpn:(n_old + 1) * gpn, n_new * gpn:(n_new + 1) * gpn]
            g_old, g_new = linear_sum_assignment(block, maximize=True)
            out[layer, n_old * gpn + g_old] = new[layer, n_new * gpn + g_new]
    return out


