"""Plain NumPy reference of the replay kernels, written independently of them: whole arrays, no carried state.

Used by the tests (identical integer metrics on random traces) and by bench/bench_replay.py (speed ratio).
The per-step dispatch policies (dispatch_kernels) have their twins here too: one token at a time for
least-loaded, a linear program (scipy's HiGHS) for lp.
Shape legend: T tokens, L layers, K top-k, E experts, G GPUs, S slots per GPU, M = G*S, N nodes, P steps.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from simulator.metrics import sglang_layer_balancedness
from simulator.placement import Placement


@dataclass
class ReferenceResult:
    tot_gpu: np.ndarray  # [L, G] assignments per GPU
    leave_gpu: np.ndarray  # [L]
    leave_node: np.ndarray  # [L]
    su_pairs: np.ndarray  # [L] unique (token, GPU) pairs inside the source node
    so_pairs: np.ndarray  # [L] unique (token, node) pairs to other nodes
    dropped: np.ndarray  # [L]
    active: np.ndarray  # [L] summed over steps: slots with at least one assignment
    peak: np.ndarray  # [L] summed over steps: the busiest GPU's assignments
    step_ntok: np.ndarray  # [P]
    step_imbalance: np.ndarray  # [P]
    step_sglang_sum: np.ndarray  # [P] sum over layers of SGLang's per-layer balancedness (simulator.metrics)
    step_time: np.ndarray  # [P] seconds on the one cost row given


def _step_ids(keys: np.ndarray) -> np.ndarray:
    """Run index of each token: a new step starts where the key changes."""
    if keys.size == 0:
        return np.zeros(0, dtype=np.int64)
    change = np.concatenate([[0], (keys[1:] != keys[:-1]).astype(np.int64)])
    return np.cumsum(change)


def reference_split(policy: str, static: list[np.ndarray], gpus: list[np.ndarray],
                    num_gpus: int) -> list[np.ndarray]:
    """One layer of one step: static[e] [r_e] the static rule's tokens on each of expert e's replicas (on GPUs
    gpus[e], ascending); returns the policy's tokens per replica."""
    demand = [int(c.sum()) for c in static]
    if policy == "static":
        return [c.copy() for c in static]
    if policy == "round-robin":  # the step's tokens handed to the replicas in turn
        return [np.bincount(np.arange(d) % g.size, minlength=g.size)
                for d, g in zip(demand, gpus, strict=True)]
    if policy == "lp":
        return lp_split(static, gpus, num_gpus)
    load = np.zeros(num_gpus, dtype=np.int64)
    for c, g in zip(static, gpus, strict=True):
        np.add.at(load, g, c)
    split = [c.copy() for c in static]
    for e in sorted((e for e in range(len(gpus)) if gpus[e].size > 1), key=lambda e: (-demand[e], e)):
        load[gpus[e]] -= split[e]
        split[e] = np.zeros(gpus[e].size, dtype=np.int64)
        for _ in range(demand[e]):  # each token to the replica whose GPU is least loaded now
            j = int(np.argmin(load[gpus[e]]))
            split[e][j] += 1
            load[gpus[e][j]] += 1
    return split


def _split_lp(static: list[np.ndarray], gpus: list[np.ndarray], num_gpus: int) -> dict:
    """The split as linear constraints: one column per replica of an expert with several (x >= 0), rows
    A_ub [G, n] summing each GPU's columns, A_eq [experts, n] each expert's; its fixed load per GPU, the
    demands b_eq."""
    fixed = np.zeros(num_gpus)
    multi = [e for e in range(len(gpus)) if gpus[e].size > 1]
    for c, g in zip(static, gpus, strict=True):
        if g.size == 1:
            fixed[g[0]] += c.sum()
    cols = [(row, int(gpu)) for row, e in enumerate(multi) for gpu in gpus[e]]
    a_ub, a_eq = np.zeros((num_gpus, len(cols))), np.zeros((len(multi), len(cols)))
    for i, (row, gpu) in enumerate(cols):
        a_ub[gpu, i] = a_eq[row, i] = 1.0
    return {"fixed": fixed, "multi": multi, "a_ub": a_ub, "a_eq": a_eq,
            "b_eq": np.array([static[e].sum() for e in multi], dtype=np.float64)}


def lp_optimum(static: list[np.ndarray], gpus: list[np.ndarray], num_gpus: int) -> float:
    """The lowest busiest-GPU load of any fractional split (linprog, HiGHS): minimise z with every GPU's
    fixed load plus its columns at most z."""
    from scipy.optimize import linprog

    lp = _split_lp(static, gpus, num_gpus)
    n = lp["a_ub"].shape[1]
    if n == 0:
        return float(lp["fixed"].max())
    a_ub = np.hstack([lp["a_ub"], -np.ones((num_gpus, 1))])
    a_eq = np.hstack([lp["a_eq"], np.zeros((len(lp["multi"]), 1))])
    res = linprog(np.r_[np.zeros(n), 1.0], A_ub=a_ub, b_ub=-lp["fixed"], A_eq=a_eq, b_eq=lp["b_eq"],
                  bounds=[(0, None)] * (n + 1), method="highs")
    assert res.status == 0, res.message
    return float(res.fun)


def lp_split(static: list[np.ndarray], gpus: list[np.ndarray], num_gpus: int) -> list[np.ndarray]:
    """The LP's split in whole tokens: its optimum z* rounded up, then a vertex of {splits with every GPU at
    most that} (integral: the constraints are a bipartite graph's incidence matrix)."""
    from scipy.optimize import linprog

    lp = _split_lp(static, gpus, num_gpus)
    split = [c.copy() for c in static]
    if not lp["multi"]:
        return split
    cap = np.ceil(lp_optimum(static, gpus, num_gpus) - 1e-7) - lp["fixed"]
    res = linprog(np.zeros(lp["a_ub"].shape[1]), A_ub=lp["a_ub"], b_ub=cap, A_eq=lp["a_eq"], b_eq=lp["b_eq"],
                  bounds=[(0, None)] * lp["a_ub"].shape[1], method="highs-ds")
    assert res.status == 0, res.message
    x = np.rint(res.x).astype(np.int64)
    assert np.allclose(res.x, x, atol=1e-6)
    i = 0
    for e in lp["multi"]:
        split[e] = x[i: i + gpus[e].size]
        i += gpus[e].size
    return split


def _dispatched_slots(policy: str, slot: np.ndarray, e_l: np.ndarray, src: np.ndarray, sid: np.ndarray,
                      flat: np.ndarray, s: int, num_gpus: int) -> np.ndarray:
    """One layer's slots [T', K] under a dispatch policy, from the static rule's: per step, the policy's
    split handed out local-first (a token whose GPU holds a replica with tokens left stays there; the others
    fill the replicas with tokens left, first replica first, in token order)."""
    out = slot.copy()
    replicas = [np.flatnonzero(flat == e) for e in range(int(flat.max()) + 1)]
    gpus = [r // s for r in replicas]
    for step in np.unique(sid):
        rows = np.flatnonzero(sid == step)
        e_s, gpu_s = e_l[rows], slot[rows] // s
        static = [np.array([int(((e_s == e) & (gpu_s == g)).sum()) for g in gpus[e]])
                  for e in range(len(gpus))]
        left = reference_split(policy, static, gpus, num_gpus)
        chosen = -np.ones(e_s.shape, dtype=np.int64)
        for i, row in enumerate(rows):
            for k, e in enumerate(e_s[i]):
                hit = np.flatnonzero(gpus[e] == src[row])
                if hit.size and left[e][hit[0]] > 0:
                    left[e][hit[0]] -= 1
                    chosen[i, k] = replicas[e][hit[0]]
        for i, k in zip(*np.nonzero(chosen < 0), strict=True):
            e = e_s[i, k]
            j = int(np.flatnonzero(left[e] > 0)[0])
            left[e][j] -= 1
            chosen[i, k] = replicas[e][j]
        out[rows] = chosen
    return out


def reference_replay(ids: np.ndarray, steps: np.ndarray, phases: np.ndarray, placement: Placement, *,
                     model: np.ndarray, cost_row: np.ndarray, phase_filter: int = -1, score_start: int = 0,
                     tokens_per_step: int = 0, dispatch: str = "static") -> ReferenceResult:
    """Replay whole arrays ids [T, L, K], steps [T], phases [T] on one placement with the documented rules."""
    from simulator import kernels as K

    t_all = np.arange(ids.shape[0], dtype=np.int64)
    sel = t_all >= score_start
    if phase_filter >= 0:
        sel &= phases == phase_filter
    t = t_all[sel]
    ph = phases[sel].astype(np.int64)
    e_ids = ids[sel].astype(np.int64)  # [T', L, K]
    if tokens_per_step > 0:
        within = np.zeros(t.size, dtype=np.int64)
        for p in (0, 1):
            mask = ph == p
            within[mask] = np.arange(mask.sum())
        keys = ph * (1 << 40) + within // tokens_per_step
    else:
        keys = steps[sel].astype(np.int64)
    sid = _step_ids(keys)
    n_steps = int(sid[-1]) + 1 if sid.size else 0
    layers, g, s = placement.slots.shape
    m = g * s
    gpn = min(placement.gpus_per_node, g)
    n_nodes = max(1, g // gpn)
    e_count = placement.num_experts
    src = t % g
    src_node = src // gpn
    rr = t // g
    out = {name: np.zeros(layers, dtype=np.int64) for name in
           ("leave_gpu", "leave_node", "su_pairs", "so_pairs", "dropped", "active", "peak")}
    tot_gpu = np.zeros((layers, g), dtype=np.int64)
    slot_cnt = np.zeros((n_steps, layers, m), dtype=np.int64)
    su_send = np.zeros((n_steps, layers, g), dtype=np.int64)
    su_recv = np.zeros_like(su_send)
    so_send = np.zeros((n_steps, layers, n_nodes), dtype=np.int64)
    so_recv = np.zeros_like(so_send)
    for layer in range(layers):
        flat = placement.slots[layer].reshape(-1)  # [M]
        local = -np.ones((e_count, g), dtype=np.int64)  # slot of expert e on GPU g, if any
        rep_lists = [np.flatnonzero(flat == e) for e in range(e_count)]
        n_rep = np.array([r.size for r in rep_lists])
        width = int(n_rep.max())
        rep = np.zeros((e_count, width), dtype=np.int64)
        for e, r in enumerate(rep_lists):
            rep[e, : r.size] = r
            local[e, r // s] = r
        e_l = e_ids[:, layer, :]  # [T', K]
        loc = local[e_l, src[:, None]]
        fallback = rep[e_l, rr[:, None] % n_rep[e_l]]
        slot = np.where(loc >= 0, loc, fallback)  # [T', K]
        if dispatch != "static":
            slot = _dispatched_slots(dispatch, slot, e_l, src, sid, flat, s, g)
        gpu = slot // s
        node = gpu // gpn
        tot_gpu[layer] = np.bincount(gpu.ravel(), minlength=g)
        away = gpu != src[:, None]
        cross = node != src_node[:, None]
        out["leave_gpu"][layer] = away.sum()
        out["leave_node"][layer] = cross.sum()
        np.add.at(slot_cnt[:, layer, :], (np.repeat(sid, e_l.shape[1]), slot.ravel()), 1)
        # unique destinations per token
        to_gpu = np.zeros((t.size, g), dtype=bool)
        rows = np.repeat(np.arange(t.size), e_l.shape[1])
        to_gpu[rows, gpu.ravel()] = True
        to_gpu[np.arange(t.size), src] = False
        same_node = (np.arange(g)[None, :] // gpn) == src_node[:, None]
        su = to_gpu & same_node  # [T', G]
        out["su_pairs"][layer] = su.sum()
        np.add.at(su_send[:, layer, :], (sid, src), su.sum(axis=1))
        recv_t, recv_g = np.nonzero(su)
        np.add.at(su_recv[:, layer, :], (sid[recv_t], recv_g), 1)
        to_node = np.zeros((t.size, n_nodes), dtype=bool)
        to_node[rows, node.ravel()] = True
        to_node[np.arange(t.size), src_node] = False
        out["so_pairs"][layer] = to_node.sum()
        np.add.at(so_send[:, layer, :], (sid, src_node), to_node.sum(axis=1))
        recv_t, recv_n = np.nonzero(to_node)
        np.add.at(so_recv[:, layer, :], (sid[recv_t], recv_n), 1)
    step_ntok = np.bincount(sid, minlength=n_steps) if n_steps else np.zeros(0, dtype=np.int64)
    # pricing, per step and layer
    used = int((placement.slots[0] >= 0).sum())
    cf = model[K.M_CAPACITY_FACTOR]
    cap = np.ceil(cf * step_ntok * model[K.M_TOP_K] / used) if cf > 0 else np.full(n_steps, np.inf)
    kept = np.minimum(slot_cnt, cap[:, None, None])  # [P, L, M]
    out["dropped"] = (slot_cnt - kept).sum(axis=(0, 2)).astype(np.int64)
    act = (slot_cnt > 0).reshape(n_steps, layers, g, s).sum(axis=3)  # [P, L, G]
    out["active"] = act.sum(axis=(0, 2))
    per_gpu = slot_cnt.reshape(n_steps, layers, g, s).sum(axis=3)  # [P, L, G]
    out["peak"] = per_gpu.max(axis=2).sum(axis=0) if n_steps else np.zeros(layers, dtype=np.int64)
    step_imb = per_gpu.max(axis=2).sum(axis=1) / (per_gpu.sum(axis=2) / g).sum(axis=1)
    step_sglang = sglang_layer_balancedness(per_gpu.mean(axis=2), per_gpu.max(axis=2).astype(np.float64))
    flops = kept.reshape(n_steps, layers, g, s).sum(axis=3) * model[K.M_FLOPS]
    t_exp = np.maximum(flops / cost_row[K.C_FLOPS],
                       act * model[K.M_EXPERT_BYTES] / cost_row[K.C_HBM]).max(axis=2)
    su_max = np.maximum(su_send, su_recv).max(axis=2)  # [P, L]
    so_max = np.maximum(so_send, so_recv).max(axis=2)
    times = t_exp.copy()
    for nbytes, su_col, so_col in ((model[K.M_DISPATCH_BYTES], K.C_SU_DISPATCH, K.C_SO_DISPATCH),
                                   (model[K.M_COMBINE_BYTES], K.C_SU_COMBINE, K.C_SO_COMBINE)):
        t_su = np.where(su_max > 0, su_max * nbytes / cost_row[su_col] + cost_row[K.C_SU_LAT], 0.0)
        t_so = np.where(so_max > 0, so_max / gpn * nbytes / cost_row[so_col] + cost_row[K.C_SO_LAT], 0.0)
        times += np.maximum(t_su, t_so)
    return ReferenceResult(tot_gpu=tot_gpu, step_ntok=step_ntok, step_imbalance=step_imb,
                           step_sglang_sum=step_sglang.sum(axis=1), step_time=times.sum(axis=1), **out)
