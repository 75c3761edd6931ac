"""Traffic-aware fitting, layer by layer: the co-selection swaps of `coactivation` (plus, for `affinity`, the
pull of cross-layer co-selection), then the token-level search on sampled steps (traffic_search), both under
the load caps. Pure NumPy around the Numba kernels; no I/O.

Shape legend: L MoE layers, G GPUs, S slots per GPU, E experts, N sampled tokens, K top-k, P sampled steps.

The load trade: every GPU stays under max(the start's heaviest, mean x (1 + load_slack)) of the fit load, and
the sampled steps' summed busiest-GPU load stays within (1 + step_budget) of the start's (balanced, or
replicated with redundant slots), since co-locating experts that tokens choose together also piles a step's
tokens onto fewer GPUs. The co-selection swaps are kept only when they respect that budget; otherwise the
token-level search starts from the balanced start itself.
"""

from __future__ import annotations

import numpy as np

from simulator.placement.packing import coactivation_layer
from simulator.placement.routing import RoutingSample
from simulator.placement.traffic_search import token_pairs, traffic_search_layer

# The sampled steps' summed busiest-GPU load may grow this much over the start's (docs/simulator.md shows
# the trade-off curve; bench/bench_traffic.py measures it).
STEP_BUDGET = 0.02


def serving_gpus(slots: np.ndarray, tok_e: np.ndarray, src: np.ndarray, token: np.ndarray) -> np.ndarray:
    """[N, K] GPU serving each sampled assignment by the replay's replica rule: the replica on the source GPU
    if there is one, else replica number (token // G) mod (replicas), replicas in slot order (kernels.py).
    slots [G, S] one layer; tok_e [N, K]; src, token [N]."""
    g_count, s_count = slots.shape
    flat = slots.ravel()
    experts = int(max(flat.max(), tok_e.max(initial=0))) + 1
    counts = np.bincount(flat[flat >= 0], minlength=experts)
    order = np.argsort(np.where(flat >= 0, flat, experts), kind="stable")  # slots grouped by expert
    first = np.r_[0, np.cumsum(counts)[:-1]]
    held = np.zeros((experts, g_count), dtype=bool)
    held[flat[flat >= 0], np.flatnonzero(flat >= 0) // s_count] = True
    pick = (token[:, None] // g_count) % np.maximum(counts[tok_e], 1)
    fallback = order[first[tok_e] + pick] // s_count
    return np.where(held[tok_e, src[:, None]], src[:, None], fallback)


def sampled_peaks(gpu: np.ndarray, step: np.ndarray, num_steps: int, num_gpus: int) -> int:
    """Summed over sampled steps, the busiest GPU's assignments. gpu [N, K]; step [N]."""
    load = np.zeros((num_steps, num_gpus), dtype=np.int64)
    np.add.at(load, (np.repeat(step, gpu.shape[1]), gpu.ravel()), 1)
    return int(load.max(axis=1).sum()) if num_steps else 0


def attraction(cross: np.ndarray, prev_slots: np.ndarray, num_experts: int) -> np.ndarray:
    """[E, G] tokens arriving on GPU g (their previous layer's top-1 expert served there) that choose e.
    cross [E, E]: previous layer's top-1 a -> this layer's b; prev_slots [G, S]. A replicated top-1 expert
    sends its tokens to its replicas' GPUs evenly."""
    g_count = prev_slots.shape[0]
    share = np.zeros((num_experts, g_count))  # [E_prev, G] where a's tokens sit
    for g in range(g_count):
        held = prev_slots[g][prev_slots[g] >= 0]
        share[held, g] = 1.0
    share /= np.maximum(share.sum(axis=1, keepdims=True), 1.0)
    return cross.T.astype(np.float64) @ share


def traffic_layers(load: np.ndarray, start: np.ndarray, coselection: np.ndarray, routing: RoutingSample, *,
                   gpus_per_node: int, node_weight: float, stay: bool, load_slack: float,
                   step_budget: float = STEP_BUDGET) -> np.ndarray:
    """Fit every layer (module docstring). load [L, E]; start [L, G, S] the balanced or replicated packing;
    coselection [L, E, E]. stay: sources follow the previous layer's top-1 expert (the affinity policy) and
    the co-selection swaps also pull experts toward the GPUs their tokens arrive on; else sources are the
    home GPUs. Returns slots [L, G, S]."""
    layers, experts = load.shape
    g_count = start.shape[1]
    out = start.astype(np.int64).copy()
    home = routing.token % g_count
    src = home.copy()
    for layer in range(layers):
        lw = load[layer].astype(np.float64)
        base = out[layer]
        counts = np.bincount(base[base >= 0], minlength=experts)
        per = np.divide(lw, counts, out=np.zeros(experts), where=counts > 0)
        gpu_load = np.array([per[r[r >= 0]].sum() for r in base])
        cap = max(gpu_load.max(), lw.sum() / g_count * (1 + load_slack))
        pull = (attraction(routing.cross_layer[layer - 1], out[layer - 1], experts)
                if stay and layer > 0 else np.zeros((experts, g_count)))
        swapped = coactivation_layer(base, lw, coselection[layer].astype(np.float64), gpus_per_node,
                                     node_weight, cap, 4 * experts, pull)
        tok_e = routing.ids[:, layer, :].astype(np.int64)
        if tok_e.shape[0] == 0:
            out[layer] = swapped
            continue
        steps = routing.num_steps
        step_cap = sampled_peaks(serving_gpus(base, tok_e, src, routing.token), routing.step, steps,
                                 g_count) * (1 + step_budget)
        begin = swapped
        if sampled_peaks(serving_gpus(swapped, tok_e, src, routing.token), routing.step, steps,
                         g_count) > step_cap:
            begin = base
        fixed = np.where(counts[tok_e] > 1, serving_gpus(begin, tok_e, src, routing.token), -1)
        out[layer] = traffic_search_layer(begin, counts == 1, per, tok_e, fixed, src, routing.step, steps,
                                          gpus_per_node, node_weight, cap, step_cap, 8 * experts)
        if stay and layer + 1 < layers:
            src = serving_gpus(out[layer], tok_e, src, routing.token)[:, 0]  # where the top-1 expert ran
    return out.astype(np.int32)


def sampled_pairs(slots: np.ndarray, routing: RoutingSample, *, gpus_per_node: int, node_weight: float,
                  stay: bool) -> float:
    """The search's objective for a whole placement [L, G, S] on the sample (pairs summed over layers)."""
    g_count = slots.shape[1]
    src = routing.token % g_count
    total = 0.0
    for layer in range(slots.shape[0]):
        tok_e = routing.ids[:, layer, :].astype(np.int64)
        gpu = serving_gpus(slots[layer], tok_e, src, routing.token)
        loc = np.zeros(int(tok_e.max(initial=0)) + 1, dtype=np.int64)
        total += token_pairs(tok_e, gpu, src, loc, g_count, gpus_per_node, node_weight)
        if stay:
            src = gpu[:, 0]
    return total
