"""Numba kernel scoring placements' all-to-all traffic and step load under two dispatch models (no I/O).

Shape legend: T tokens in a chunk, L MoE layers, K top-k, E experts, V placements, G GPUs (padded), M slots,
R replicas (padded), Q open-step states (2 with regrouped steps, one per phase, else 1).

Dispatch models (DISPATCH_MODELS):
- home: a token starts every layer on its home GPU (global index mod G) and its expert outputs come back
  there, as kernels.replay_chunk prices it: dispatch pairs = combine pairs = unique (token, GPU) pairs to
  GPUs other than home inside its node, plus unique (token, node) pairs to other nodes.
- stay: the token stays where its layer's top-1 expert ran (ExFlow): layer l's dispatch goes from the GPU it
  is on, s_l (home at the first layer), to the GPUs serving its experts; the combine brings those outputs and
  its residual (on s_l) to d_l, the GPU of its top-1 expert (home after the last layer), and s_{l+1} = d_l.
  Combine pairs count the senders other than d_l, by the same scale-up / scale-out rule.
The serving replica follows the replay's rule from the GPU the token is on (the replica there, else number
(token // G) mod replicas).
"""

from __future__ import annotations

import numpy as np
from numba import njit

from simulator.kernels import step_key

DISPATCH_MODELS = ("home", "stay")
# pair totals per variant and layer (pairs [V, L, 4])
P_SU_DISPATCH, P_SO_DISPATCH, P_SU_COMBINE, P_SO_COMBINE = range(4)


@njit(cache=True)
def _count_pairs(gpus: np.ndarray, n: int, hub: int, gpn: int, nodes: np.ndarray) -> tuple[int, int]:
    """(scale-up, scale-out) pairs between `hub` and the distinct GPUs among gpus[:n] other than it: one per
    GPU in hub's node, one per other node. nodes: scratch [>= nodes]."""
    su = 0
    so = 0
    hub_node = hub // gpn
    n_nodes = 0
    for i in range(n):
        g = gpus[i]
        if g == hub:
            continue
        dup = False
        for j in range(i):
            if gpus[j] == g:
                dup = True
                break
        if dup:
            continue
        node = g // gpn
        if node == hub_node:
            su += 1
            continue
        seen = False
        for j in range(n_nodes):
            if nodes[j] == node:
                seen = True
                break
        if not seen:
            nodes[n_nodes] = node
            n_nodes += 1
            so += 1
    return su, so


@njit(cache=True)
def close_steps(open_load: np.ndarray, open_ntok: np.ndarray, var_gpus: np.ndarray, peak_sum: np.ndarray,
                mean_sum: np.ndarray, n_steps: np.ndarray, v: int, q: int) -> None:
    """Add the open step of variant v, state q to the step totals and clear it."""
    if open_ntok[v, q] == 0:
        return
    g_count = var_gpus[v]
    for layer in range(open_load.shape[2]):
        peak = 0
        total = 0
        for g in range(g_count):
            c = open_load[v, q, layer, g]
            peak = max(peak, c)
            total += c
            open_load[v, q, layer, g] = 0
        peak_sum[v] += peak
        mean_sum[v] += total / g_count
    n_steps[v] += 1
    open_ntok[v, q] = 0


@njit(cache=True)
def traffic_chunk(ids: np.ndarray, steps: np.ndarray, phases: np.ndarray, t0: int, phase_filter: int,
                  score_start: int, tokens_per_step: int, stay: bool, var_gpus: np.ndarray,
                  var_gpn: np.ndarray, rep_count: np.ndarray, rep_slot: np.ndarray, local_slot: np.ndarray,
                  slot_gpu: np.ndarray, sel_count: np.ndarray, cur_key: np.ndarray, open_ntok: np.ndarray,
                  open_load: np.ndarray, pairs: np.ndarray, peak_sum: np.ndarray, mean_sum: np.ndarray,
                  n_steps: np.ndarray, tokens: np.ndarray) -> None:
    """Score one chunk for every variant (module docstring); state carries from chunk to chunk.

    ids [T, L, K]; steps, phases [T]; t0 global index of the chunk's first token; a token is scored when its
    phase matches phase_filter (-1: both) and its index >= score_start; steps are keyed as the replay keys
    them (kernels.step_key), with one open step per phase when tokens_per_step > 0 (the replay's phase split).
    Variant arrays as segment.VariantArrays builds them. State: sel_count [2] scored tokens per phase so far;
    cur_key, open_ntok [V, Q]; open_load [V, Q, L, G]. Totals: pairs [V, L, 4] (P_*); peak_sum, mean_sum [V]
    summed over closed steps and layers (step imbalance = peak_sum / mean_sum); n_steps, tokens [V].
    """
    n_tok, layers, top_k = ids.shape
    served = np.zeros(top_k + 1, dtype=np.int64)
    scratch = np.zeros(top_k + 1, dtype=np.int64)
    sel_start = sel_count.copy()
    for v in range(var_gpus.shape[0]):
        sel_count[:] = sel_start
        g_count = var_gpus[v]
        gpn = var_gpn[v]
        for i in range(n_tok):
            ph = phases[i]
            t = t0 + i
            if (phase_filter >= 0 and ph != phase_filter) or t < score_start:
                continue
            sel = sel_count[ph]
            sel_count[ph] += 1
            q = ph if tokens_per_step > 0 else 0
            key = step_key(ph, sel, steps[i], tokens_per_step)
            if key != cur_key[v, q]:
                close_steps(open_load, open_ntok, var_gpus, peak_sum, mean_sum, n_steps, v, q)
                cur_key[v, q] = key
            open_ntok[v, q] += 1
            tokens[v] += 1
            home = t % g_count
            rr = t // g_count
            src = home
            for layer in range(layers):
                for k in range(top_k):
                    e = ids[i, layer, k]
                    slot = local_slot[v, layer, e, src]
                    if slot < 0:
                        n_rep = rep_count[v, layer, e]
                        slot = rep_slot[v, layer, e, 0] if n_rep == 1 else rep_slot[v, layer, e, rr % n_rep]
                    g = slot_gpu[v, slot]
                    served[k] = g
                    open_load[v, q, layer, g] += 1
                su, so = _count_pairs(served, top_k, src, gpn, scratch)
                pairs[v, layer, P_SU_DISPATCH] += su
                pairs[v, layer, P_SO_DISPATCH] += so
                dest = served[0] if stay and layer + 1 < layers else home
                served[top_k] = src  # the residual joins the outputs at the destination
                su, so = _count_pairs(served, top_k + 1, dest, gpn, scratch)
                pairs[v, layer, P_SU_COMBINE] += su
                pairs[v, layer, P_SO_COMBINE] += so
                src = dest
