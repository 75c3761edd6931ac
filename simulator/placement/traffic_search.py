"""Token-level local search (Numba) for one layer: swap experts between GPUs to cut the unique (token, GPU)
pairs the cost model charges for all-to-all, on sampled steps of real routing, while the sampled steps' load
stays within a budget.

Shape legend: G GPUs, S slots per GPU, E experts, N sampled tokens, K top-k, P sampled steps, Nn nodes.

A token's pairs (what kernels.replay_chunk counts): one per GPU other than its source that serves one of its
experts inside the source's node (scale-up), and `node_weight` per other node serving one (scale-out; the
replay counts one pair per node, charged at the slower scale-out bandwidth). The source is the token's home
GPU (token mod G) or, with the stay dispatch model, the GPU of its previous layer's top-1 expert.

Only experts with one replica move (a swap keeps every GPU's slot count); replicated experts stay where the
packing put them and their tokens are served by the replay's replica rule, fixed per token by the caller
(`fixed_gpu`). A swap is kept only if it lowers the pairs, both GPUs stay under `cap` (the fit load per GPU)
and the sampled steps' summed busiest-GPU load stays under `step_cap`: the trade of load against traffic.
"""

from __future__ import annotations

import numpy as np
from numba import njit

# Candidate swaps, ranked by the sum of their two one-way move gains, that are scored exactly per pass.
EXACT_CANDIDATES = 16


@njit(cache=True)
def _holds(tok_e: np.ndarray, t: int, e: int) -> bool:
    for k in range(tok_e.shape[1]):  # noqa: SIM110 (a plain loop: Numba has no generator any())
        if tok_e[t, k] == e:
            return True
    return False


@njit(cache=True)
def _move_delta(cnt: np.ndarray, node_cnt: np.ndarray, t: int, src: int, g1: int, g2: int, gpn: int,
                node_weight: float) -> float:
    """Change in token t's pairs when one of its experts moves from GPU g1 to GPU g2."""
    sn = src // gpn
    n1, n2 = g1 // gpn, g2 // gpn
    d = 0.0
    if g1 != src and n1 == sn and cnt[t, g1] == 1:
        d -= 1.0
    if g2 != src and n2 == sn and cnt[t, g2] == 0:
        d += 1.0
    if n1 != n2:
        if n1 != sn and node_cnt[t, n1] == 1:
            d -= node_weight
        if n2 != sn and node_cnt[t, n2] == 0:
            d += node_weight
    return d


@njit(cache=True)
def _token_gains(gain: np.ndarray, sign: float, t: int, tok_e: np.ndarray, movable: np.ndarray,
                 loc: np.ndarray, cnt: np.ndarray, node_cnt: np.ndarray, src: int, gpn: int,
                 node_weight: float, leave: np.ndarray, enter: np.ndarray, leave_n: np.ndarray,
                 enter_n: np.ndarray) -> None:
    """Add sign x token t's move deltas (_move_delta for every move of each of its movable experts) into gain
    [E, G]; leave, enter [G] and leave_n, enter_n [Nn] are scratch."""
    g_count = gain.shape[1]
    sn = src // gpn
    for g in range(g_count):
        inside = g != src and g // gpn == sn
        leave[g] = -1.0 if inside and cnt[t, g] == 1 else 0.0
        enter[g] = 1.0 if inside and cnt[t, g] == 0 else 0.0
    multi = node_cnt.shape[1] > 1
    if multi:
        for n in range(node_cnt.shape[1]):
            leave_n[n] = -node_weight if n != sn and node_cnt[t, n] == 1 else 0.0
            enter_n[n] = node_weight if n != sn and node_cnt[t, n] == 0 else 0.0
    for k in range(tok_e.shape[1]):
        e = tok_e[t, k]
        if not movable[e]:
            continue
        g1 = loc[e]
        out_g1 = sign * leave[g1]
        n1 = g1 // gpn
        for g2 in range(g_count):
            if g2 == g1:
                continue
            d = out_g1 + sign * enter[g2]
            if multi and g2 // gpn != n1:
                d += sign * (leave_n[n1] + enter_n[g2 // gpn])
            gain[e, g2] += d


@njit(cache=True)
def token_pairs(tok_e: np.ndarray, fixed_gpu: np.ndarray, tok_src: np.ndarray, loc: np.ndarray, num_gpus: int,
                gpus_per_node: int, node_weight: float) -> float:
    """The objective: pairs summed over the sampled tokens (module docstring) for experts on GPUs `loc` [E]
    (fixed_gpu [N, K] >= 0 overrides it for replicated experts)."""
    n_tok, top_k = tok_e.shape
    nodes = max(1, num_gpus // gpus_per_node)
    total = 0.0
    seen_g = np.zeros(num_gpus, dtype=np.bool_)
    seen_n = np.zeros(nodes, dtype=np.bool_)
    for t in range(n_tok):
        seen_g[:] = False
        seen_n[:] = False
        src = tok_src[t]
        sn = src // gpus_per_node
        for k in range(top_k):
            g = fixed_gpu[t, k] if fixed_gpu[t, k] >= 0 else loc[tok_e[t, k]]
            n = g // gpus_per_node
            if n == sn:
                if g != src and not seen_g[g]:
                    seen_g[g] = True
                    total += 1.0
            elif not seen_n[n]:
                seen_n[n] = True
                total += node_weight
    return total


@njit(cache=True)
def traffic_search_layer(slots: np.ndarray, movable: np.ndarray, per_replica: np.ndarray, tok_e: np.ndarray,
                         fixed_gpu: np.ndarray, tok_src: np.ndarray, tok_step: np.ndarray, num_steps: int,
                         gpus_per_node: int, node_weight: float, cap: float, step_cap: float,
                         max_swaps: int) -> np.ndarray:
    """Swap movable experts between GPUs while the pairs drop and the caps hold (module docstring).

    slots [G, S] expert ids (-1 empty); movable [E] experts with one replica; per_replica [E] fit load per
    replica; tok_e [N, K]; fixed_gpu [N, K] serving GPU of a replicated expert (-1: movable, served where it
    sits); tok_src [N]; tok_step [N] in 0..P-1. Each round scores every swap by its two one-way move gains
    (kept incrementally in gain [E, G]), scores the EXACT_CANDIDATES best exactly (tokens holding both
    experts see no change; the step loads are checked) and applies the best that lowers the pairs. Returns
    the new slots.
    """
    g_count, s_count = slots.shape
    e_count = movable.shape[0]
    n_tok, top_k = tok_e.shape
    gpn = gpus_per_node
    nodes = max(1, g_count // gpn)
    out = slots.copy()
    loc = -np.ones(e_count, dtype=np.int64)
    gpu_load = np.zeros(g_count)
    for g in range(g_count):
        for s in range(s_count):
            e = out[g, s]
            if e >= 0:
                gpu_load[g] += per_replica[e]
                if movable[e]:
                    loc[e] = g
    # tokens holding each movable expert (CSR)
    start = np.zeros(e_count + 1, dtype=np.int64)
    for t in range(n_tok):
        for k in range(top_k):
            if fixed_gpu[t, k] < 0:
                start[tok_e[t, k] + 1] += 1
    for e in range(e_count):
        start[e + 1] += start[e]
    tok_of = np.empty(start[e_count], dtype=np.int64)
    fill = start[:-1].copy()
    cnt = np.zeros((n_tok, g_count), dtype=np.int64)
    node_cnt = np.zeros((n_tok, nodes), dtype=np.int64)
    step_load = np.zeros((num_steps, g_count), dtype=np.int64)
    for t in range(n_tok):
        for k in range(top_k):
            e = tok_e[t, k]
            g = fixed_gpu[t, k]
            if g < 0:
                g = loc[e]
                tok_of[fill[e]] = t
                fill[e] += 1
            cnt[t, g] += 1
            node_cnt[t, g // gpn] += 1
            step_load[tok_step[t], g] += 1
    step_max = np.zeros(num_steps, dtype=np.int64)
    for p in range(num_steps):
        step_max[p] = step_load[p].max()
    peak_sum = step_max.sum()
    gain = np.zeros((e_count, g_count))
    leave, enter = np.zeros(g_count), np.zeros(g_count)
    leave_n, enter_n = np.zeros(nodes), np.zeros(nodes)
    for t in range(n_tok):
        _token_gains(gain, 1.0, t, tok_e, movable, loc, cnt, node_cnt, tok_src[t], gpn, node_weight, leave,
                     enter, leave_n, enter_n)
    touched = np.zeros(n_tok, dtype=np.bool_)
    d_step = np.zeros((num_steps, g_count), dtype=np.int64)
    step_hit = np.zeros(num_steps, dtype=np.bool_)
    cand_val = np.empty(EXACT_CANDIDATES)
    cand = np.empty((EXACT_CANDIDATES, 4), dtype=np.int64)
    for _ in range(max_swaps):
        # the best estimated swaps (ties: the earliest in (g1, s1, g2, s2) order)
        n_cand = 0
        for g1 in range(g_count):
            for s1 in range(s_count):
                e1 = out[g1, s1]
                if e1 < 0 or not movable[e1]:
                    continue
                for g2 in range(g1 + 1, g_count):
                    for s2 in range(s_count):
                        e2 = out[g2, s2]
                        if e2 < 0 or not movable[e2]:
                            continue
                        est = gain[e1, g2] + gain[e2, g1]
                        if est >= 0:
                            continue
                        if (gpu_load[g1] - per_replica[e1] + per_replica[e2] > cap
                                or gpu_load[g2] - per_replica[e2] + per_replica[e1] > cap):
                            continue
                        if n_cand == EXACT_CANDIDATES and est >= cand_val[n_cand - 1]:
                            continue
                        q = n_cand if n_cand < EXACT_CANDIDATES else EXACT_CANDIDATES - 1
                        while q > 0 and cand_val[q - 1] > est:
                            if q < EXACT_CANDIDATES:
                                cand_val[q] = cand_val[q - 1]
                                cand[q] = cand[q - 1]
                            q -= 1
                        cand_val[q] = est
                        cand[q, 0], cand[q, 1], cand[q, 2], cand[q, 3] = g1, s1, g2, s2
                        if n_cand < EXACT_CANDIDATES:
                            n_cand += 1
        best, best_q, best_peak = -1e-9, -1, peak_sum
        for q in range(n_cand):
            g1, s1, g2, s2 = cand[q, 0], cand[q, 1], cand[q, 2], cand[q, 3]
            e1, e2 = out[g1, s1], out[g2, s2]
            exact = 0.0
            for side in range(2):
                ea, eb = (e1, e2) if side == 0 else (e2, e1)
                ga, gb = (g1, g2) if side == 0 else (g2, g1)
                for j in range(start[ea], start[ea + 1]):
                    t = tok_of[j]
                    if _holds(tok_e, t, eb):
                        continue  # holds both: its GPU counts do not change
                    exact += _move_delta(cnt, node_cnt, t, tok_src[t], ga, gb, gpn, node_weight)
                    p = tok_step[t]
                    d_step[p, ga] -= 1
                    d_step[p, gb] += 1
                    step_hit[p] = True
            peak = peak_sum
            for side in range(2):
                ea = e1 if side == 0 else e2
                for j in range(start[ea], start[ea + 1]):
                    p = tok_step[tok_of[j]]
                    if step_hit[p]:
                        step_hit[p] = False
                        new_max = 0
                        for g in range(g_count):
                            new_max = max(new_max, step_load[p, g] + d_step[p, g])
                        peak += new_max - step_max[p]
                        d_step[p, g1] = 0
                        d_step[p, g2] = 0
            if exact < best and peak <= step_cap:
                best, best_q, best_peak = exact, q, peak
        if best_q < 0:
            break
        g1, s1, g2, s2 = cand[best_q, 0], cand[best_q, 1], cand[best_q, 2], cand[best_q, 3]
        e1, e2 = out[g1, s1], out[g2, s2]
        # tokens whose counts change: take their gains out, update, put them back
        for side in range(2):
            ea = e1 if side == 0 else e2
            for j in range(start[ea], start[ea + 1]):
                t = tok_of[j]
                if not touched[t]:
                    touched[t] = True
                    _token_gains(gain, -1.0, t, tok_e, movable, loc, cnt, node_cnt, tok_src[t], gpn,
                                 node_weight, leave, enter, leave_n, enter_n)
        for side in range(2):
            ea, eb = (e1, e2) if side == 0 else (e2, e1)
            ga, gb = (g1, g2) if side == 0 else (g2, g1)
            for j in range(start[ea], start[ea + 1]):
                t = tok_of[j]
                if _holds(tok_e, t, eb):
                    continue
                cnt[t, ga] -= 1
                cnt[t, gb] += 1
                node_cnt[t, ga // gpn] -= 1
                node_cnt[t, gb // gpn] += 1
                p = tok_step[t]
                step_load[p, ga] -= 1
                step_load[p, gb] += 1
        out[g1, s1], out[g2, s2] = e2, e1
        loc[e1], loc[e2] = g2, g1
        gpu_load[g1] += per_replica[e2] - per_replica[e1]
        gpu_load[g2] += per_replica[e1] - per_replica[e2]
        for side in range(2):
            ea = e1 if side == 0 else e2
            for j in range(start[ea], start[ea + 1]):
                t = tok_of[j]
                if touched[t]:
                    touched[t] = False
                    _token_gains(gain, 1.0, t, tok_e, movable, loc, cnt, node_cnt, tok_src[t], gpn,
                                 node_weight, leave, enter, leave_n, enter_n)
                    p = tok_step[t]
                    step_max[p] = step_load[p].max()
        peak_sum = best_peak
    return out
