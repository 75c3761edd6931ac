"""Numba kernels of the per-step replica dispatch policies (`--dispatch`; docs/simulator.md defines them).

A step's tokens are buffered while it is open and routed when it closes, so a policy sees the whole step's
demand per expert before it splits it over the expert's replicas; then the step is priced by
kernels.price_step like any other. `static` needs no buffer and keeps kernels.replay_chunk (run_variants uses
it); here it is routed the same way for the tests, which check the two paths agree.

Shape legend: n tokens in the step, L layers, K top-k, E experts, R replicas (padded), G GPUs, S slots per
GPU, W accumulator width (kernels.py), V variants, B buffered tokens over all variants.
Per layer the split works on counts: cnt [E, R] tokens of expert e on its replica j (replicas in slot order,
so in GPU order; a GPU never holds two replicas of one expert) and load [G] assignments per GPU.
"""

from __future__ import annotations

import numpy as np
from numba import njit

from simulator import kernels as K
from simulator.options import DISPATCH_POLICIES

P_STATIC, P_ROUND_ROBIN = DISPATCH_POLICIES.index("static"), DISPATCH_POLICIES.index("round-robin")
P_LEAST_LOADED, P_LP = DISPATCH_POLICIES.index("least-loaded"), DISPATCH_POLICIES.index("lp")


@njit(cache=True)
def waterfill(d: int, e: int, n: int, rep_gpu: np.ndarray, load: np.ndarray, cnt: np.ndarray) -> None:
    """Give expert e's d tokens to its n replicas so the highest of their GPUs' loads is lowest: raise the
    lowest GPUs to one level w, then one more token each to the replicas at w, first replica first (what
    handing the tokens out one by one to the least-loaded replica gives). Writes cnt[e, :n], adds to load."""
    levels = np.empty(n, dtype=np.int64)
    for j in range(n):
        levels[j] = load[rep_gpu[e, j]]
    ordered = np.sort(levels)
    prefix = 0
    w = 0
    for k in range(1, n + 1):
        prefix += ordered[k - 1]
        w = (d + prefix) // k  # the k lowest raised to one level
        if k == n or w < ordered[k]:
            break
    left = d
    for j in range(n):
        give = max(0, w - levels[j])
        cnt[e, j] = give
        left -= give
    for j in range(n):
        if left == 0:
            break
        if levels[j] <= w:
            cnt[e, j] += 1
            left -= 1
    for j in range(n):
        load[rep_gpu[e, j]] += cnt[e, j]


@njit(cache=True)
def lower_to(z: int, cnt: np.ndarray, n_rep: np.ndarray, rep_gpu: np.ndarray, load: np.ndarray,
             members: np.ndarray, n_members: np.ndarray, scratch: np.ndarray) -> bool:
    """Move tokens between replicas until no GPU carries more than z; False when no split can.

    Augmenting paths: from the GPUs over z, a GPU reaches another through an expert with tokens on the first
    and a replica on the second; tokens move along a path to a GPU under z. When none is reachable, the GPUs
    reached hold all of their experts' tokens, whatever the split, and one is over z: z is infeasible.
    members [G, S] (expert, replica index) pairs of the replicated experts on each GPU, as e * R + j;
    scratch [4, G].
    """
    g_count = load.shape[0]
    r_max = cnt.shape[1]
    parent = scratch[0]
    via = scratch[1]  # e * R + j of the hop into this GPU, j the replica it comes from
    to_rep = scratch[2]
    queue = scratch[3]
    while True:
        head = 0
        tail = 0
        parent[:] = -2
        for g in range(g_count):
            if load[g] > z:
                parent[g] = -1
                queue[tail] = g
                tail += 1
        if tail == 0:
            return True
        found = -1
        while head < tail and found < 0:
            g = queue[head]
            head += 1
            for q in range(n_members[g]):
                code = members[g, q]
                e = code // r_max
                j = code % r_max
                if cnt[e, j] == 0:
                    continue
                for j2 in range(n_rep[e]):
                    g2 = rep_gpu[e, j2]
                    if parent[g2] != -2:
                        continue
                    parent[g2] = g
                    via[g2] = code
                    to_rep[g2] = j2
                    if load[g2] < z:
                        found = g2
                        break
                    queue[tail] = g2
                    tail += 1
                if found >= 0:
                    break
        if found < 0:
            return False
        delta = z - load[found]
        x = found
        while parent[x] != -1:
            delta = min(delta, cnt[via[x] // r_max, via[x] % r_max])
            x = parent[x]
        delta = min(delta, load[x] - z)
        load[x] -= delta
        load[found] += delta
        x = found
        while parent[x] != -1:
            e = via[x] // r_max
            cnt[e, via[x] % r_max] -= delta
            cnt[e, to_rep[x]] += delta
            x = parent[x]


@njit(cache=True)
def split_layer(policy: int, cnt: np.ndarray, n_rep: np.ndarray, rep_gpu: np.ndarray, load: np.ndarray,
                slots_per_gpu: int) -> None:
    """One layer of one step: cnt [E, R] holds the static split on entry and the policy's on return; load [G]
    the GPU loads it gives (scratch on entry).

    static: kept. round-robin: equal shares, the first d mod r replicas one more. least-loaded: from the
    static split, each replicated expert, hottest first, re-waterfilled over its replicas given every other
    load (never raises the maximum, so never worse than static). lp: the whole-token split with the lowest
    maximum: binary search on the maximum z, each z tried by lower_to from the best split so far; that is
    the LP optimum rounded up (an integral flow exists for integer capacities), which no rounding of the LP's
    split beats.
    """
    n_exp, r_max = cnt.shape
    g_count = load.shape[0]
    load[:] = 0
    for e in range(n_exp):
        for j in range(n_rep[e]):
            load[rep_gpu[e, j]] += cnt[e, j]
    if policy == P_STATIC:
        return
    if policy == P_ROUND_ROBIN:
        for e in range(n_exp):
            n = n_rep[e]
            if n > 1:
                d = cnt[e, :n].sum()
                for j in range(n):
                    cnt[e, j] = d // n + (1 if j < d % n else 0)
        return
    demand = np.zeros(n_exp, dtype=np.int64)
    top = 0
    for e in range(n_exp):
        if n_rep[e] > 1:
            demand[e] = cnt[e, :n_rep[e]].sum()
            top = max(top, demand[e])
    # replicated experts, hottest first (ties: lower id first); the others sort last and are skipped
    keys = np.empty(n_exp, dtype=np.int64)
    for e in range(n_exp):
        keys[e] = ((top - demand[e]) * n_exp + e) if n_rep[e] > 1 else (top + 1) * n_exp + e
    for e in np.argsort(keys):
        n = n_rep[e]
        if n <= 1:
            break
        for j in range(n):
            load[rep_gpu[e, j]] -= cnt[e, j]
        waterfill(demand[e], e, n, rep_gpu, load, cnt)
    if policy != P_LP:
        return
    # lower bounds on the maximum: the mean (rounded up), any replicated expert's share, any fixed load
    lo = (load.sum() + g_count - 1) // g_count
    fixed = load.copy()
    members = np.empty((g_count, slots_per_gpu), dtype=np.int64)
    n_members = np.zeros(g_count, dtype=np.int64)
    for e in range(n_exp):
        n = n_rep[e]
        if n > 1:
            lo = max(lo, (demand[e] + n - 1) // n)
            for j in range(n):
                g = rep_gpu[e, j]
                fixed[g] -= cnt[e, j]
                members[g, n_members[g]] = e * r_max + j
                n_members[g] += 1
    lo = max(lo, fixed.max())
    hi = load.max()
    if lo >= hi:
        return
    best = cnt.copy()
    best_load = load.copy()
    scratch = np.empty((4, g_count), dtype=np.int64)
    while lo < hi:
        mid = (lo + hi) // 2
        cnt[:] = best
        load[:] = best_load
        if lower_to(mid, cnt, n_rep, rep_gpu, load, members, n_members, scratch):
            best[:] = cnt
            best_load[:] = load
            hi = load.max()
        else:
            lo = mid + 1
    cnt[:] = best
    load[:] = best_load


@njit(cache=True)
def route_step(policy: int, tok: np.ndarray, ids: np.ndarray, num_gpus: int, slots_per_gpu: int,
               gpus_per_node: int, rep_count: np.ndarray, rep_slot: np.ndarray, local_slot: np.ndarray,
               slot_gpu: np.ndarray, acc: np.ndarray, tot_int: np.ndarray) -> None:
    """Route one whole step of one variant: tok [n] global token indices, ids [n, L, K]; rep_count [L, E],
    rep_slot [L, E, R], local_slot [L, E, G], slot_gpu [M] of the variant. Fills acc [L, W] (zero on entry)
    and adds the traffic totals into tot_int [L, 8], as kernels.replay_chunk does token by token.

    Every policy starts from the static rule's choice. A non-static policy then splits each expert's tokens
    by split_layer and hands them out local-first: a token whose own GPU holds a replica with tokens left to
    take stays there; the rest fill the replicas with tokens left, first replica first, in token order. As
    the first tokens from a replica's own GPU are the ones that stay, how many stay is known from the counts
    (min(quota, local tokens)), and one pass hands out both kinds.
    """
    n, layers, top_k = ids.shape
    n_exp = rep_count.shape[1]
    r_max = rep_slot.shape[2]
    m = num_gpus * slots_per_gpu
    gpn = gpus_per_node
    n_nodes = max(1, num_gpus // gpn)
    rep_gpu = np.zeros((n_exp, r_max), dtype=np.int64)
    pos = np.empty((n_exp, num_gpus), dtype=np.int64)  # replica index of expert e on GPU g, -1: none
    cnt = np.zeros((n_exp, r_max), dtype=np.int64)  # static split, then the policy's
    stay = np.zeros((n_exp, r_max), dtype=np.int64)  # tokens from the replica's own GPU, then those kept
    far = np.zeros((n_exp, r_max), dtype=np.int64)  # the replica's tokens from other GPUs still to hand out
    nxt = np.zeros(n_exp, dtype=np.int64)  # first replica of e with `far` left
    choice = np.empty((n, top_k), dtype=np.int64)
    load = np.zeros(num_gpus, dtype=np.int64)
    mark_gpu = -np.ones(num_gpus, dtype=np.int64)
    mark_node = -np.ones(n_nodes, dtype=np.int64)
    dynamic = policy != P_STATIC
    for layer in range(layers):
        n_rep = rep_count[layer]
        pos[:] = -1
        for e in range(n_exp):
            for j in range(n_rep[e]):
                rep_gpu[e, j] = slot_gpu[rep_slot[layer, e, j]]
                pos[e, rep_gpu[e, j]] = j
        cnt[:] = 0
        stay[:] = 0
        for i in range(n):
            t = tok[i]
            src = t % num_gpus
            for k in range(top_k):
                e = ids[i, layer, k]
                j = pos[e, src]
                if j >= 0:
                    choice[i, k] = src
                    stay[e, j] += 1
                else:
                    j = (t // num_gpus) % n_rep[e]
                    choice[i, k] = rep_gpu[e, j]
                cnt[e, j] += 1
        if dynamic:
            split_layer(policy, cnt, n_rep, rep_gpu, load, slots_per_gpu)
            for e in range(n_exp):
                nxt[e] = 0
                for j in range(n_rep[e]):
                    stay[e, j] = min(stay[e, j], cnt[e, j])
                    far[e, j] = cnt[e, j] - stay[e, j]
        # traffic as kernels.replay_chunk counts it (restated: a helper shared with its inner loop, returning
        # the counts as a tuple, measured twice as slow for static replay)
        for i in range(n):
            src = tok[i] % num_gpus
            src_node = src // gpn
            stamp = i * layers + layer
            leave_gpu = 0
            leave_node = 0
            su_pairs = 0
            so_pairs = 0
            for k in range(top_k):
                e = ids[i, layer, k]
                g = choice[i, k]
                if dynamic:
                    j = pos[e, src]
                    if j >= 0 and stay[e, j] > 0:
                        stay[e, j] -= 1
                        g = src
                    else:
                        j = nxt[e]
                        while far[e, j] == 0:
                            j += 1
                        nxt[e] = j
                        far[e, j] -= 1
                        g = rep_gpu[e, j]
                acc[layer, local_slot[layer, e, g]] += 1
                if g == src:
                    continue
                node = g // gpn
                leave_gpu += 1
                if node == src_node:
                    if mark_gpu[g] != stamp:
                        mark_gpu[g] = stamp
                        acc[layer, m + num_gpus + g] += 1
                        su_pairs += 1
                else:
                    leave_node += 1
                    if mark_node[node] != stamp:
                        mark_node[node] = stamp
                        acc[layer, m + 2 * num_gpus + n_nodes + node] += 1
                        so_pairs += 1
            acc[layer, m + src] += su_pairs
            acc[layer, m + 2 * num_gpus + src_node] += so_pairs
            tot_int[layer, K.I_SU_PAIRS] += su_pairs
            tot_int[layer, K.I_SO_PAIRS] += so_pairs
            tot_int[layer, K.I_LEAVE_GPU] += leave_gpu
            tot_int[layer, K.I_LEAVE_NODE] += leave_node


@njit(cache=True)
def route_and_price(policy: int, tok: np.ndarray, ids: np.ndarray, v: int, var_gpus: np.ndarray,
                    var_slots: np.ndarray, var_gpn: np.ndarray, var_used: np.ndarray, rep_count: np.ndarray,
                    rep_slot: np.ndarray, local_slot: np.ndarray, slot_gpu: np.ndarray, model: np.ndarray,
                    cost: np.ndarray, width: int, tot_int: np.ndarray, tot_gpu: np.ndarray, comp: np.ndarray,
                    step_time: np.ndarray) -> tuple[float, float]:
    """route_step then kernels.price_step for variant v's closed step; returns its step imbalance and its sum
    over layers of SGLang's balancedness (price_step's pair)."""
    acc = np.zeros((ids.shape[1], width), dtype=np.int64)
    route_step(policy, tok, ids, var_gpus[v], var_slots[v], var_gpn[v], rep_count[v], rep_slot[v],
               local_slot[v], slot_gpu[v], acc, tot_int[v])
    return K.price_step(acc, tok.shape[0], var_gpus[v], var_slots[v], var_gpn[v], var_used[v], model, cost,
                        comp[v], tot_int[v], tot_gpu[v], step_time)


@njit(cache=True, nogil=True)
def replay_chunk_dispatch(policy: int, ids: np.ndarray, steps: np.ndarray, phases: np.ndarray, t0: int,
                          phase_filter: int, score_start: int, var_gpus: np.ndarray, var_slots: np.ndarray,
                          var_gpn: np.ndarray, var_tps: np.ndarray, var_used: np.ndarray,
                          var_phase: np.ndarray, rep_count: np.ndarray, rep_slot: np.ndarray,
                          local_slot: np.ndarray, slot_gpu: np.ndarray, model: np.ndarray, cost: np.ndarray,
                          width: int, sel_count: np.ndarray, cur_key: np.ndarray, cur_ntok: np.ndarray,
                          fresh: np.ndarray, head_key: np.ndarray, head_ntok: np.ndarray, buf_off: np.ndarray,
                          buf_tok: np.ndarray, buf_ids: np.ndarray, head_tok: np.ndarray,
                          head_ids: np.ndarray, tot_gpu: np.ndarray, tot_int: np.ndarray, comp: np.ndarray,
                          out_imb: np.ndarray, out_sglang: np.ndarray, out_time: np.ndarray,
                          out_ntok: np.ndarray, out_n: np.ndarray) -> None:
    """kernels.replay_chunk for a per-step dispatch policy: the same steps, state and outputs, but a step's
    tokens are buffered (variant v's open step in buf_tok / buf_ids [buf_off[v] : ...], its unpriced head
    step in head_tok / head_ids at the same place; the caller makes room for cur_ntok + this chunk's tokens)
    and routed by route_and_price when the step closes."""
    n_tok = ids.shape[0]
    n_var = var_gpus.shape[0]
    step_time = np.zeros(cost.shape[0])
    sel_start = sel_count.copy()
    for v in range(n_var):
        sel_count[:] = sel_start
        off = buf_off[v]
        for i in range(n_tok):
            t = t0 + i
            scored, key = K.scored_step_key(phases[i], t, steps[i], sel_count, phase_filter, score_start,
                                            var_phase[v], var_tps[v])
            if not scored:
                continue
            if key != cur_key[v]:
                n = cur_ntok[v]
                if n > 0:
                    if fresh[v]:
                        head_key[v] = cur_key[v]
                        head_ntok[v] = n
                        head_tok[off: off + n] = buf_tok[off: off + n]
                        head_ids[off: off + n] = buf_ids[off: off + n]
                        fresh[v] = 0
                    else:
                        c = out_n[v]
                        out_imb[v, c], out_sglang[v, c] = route_and_price(
                            policy, buf_tok[off: off + n], buf_ids[off: off + n], v, var_gpus, var_slots,
                            var_gpn, var_used, rep_count, rep_slot, local_slot, slot_gpu, model, cost, width,
                            tot_int, tot_gpu, comp, step_time)
                        out_time[v, :, c] = step_time
                        out_ntok[v, c] = n
                        out_n[v] = c + 1
                cur_key[v] = key
                cur_ntok[v] = 0
            buf_tok[off + cur_ntok[v]] = t
            buf_ids[off + cur_ntok[v]] = ids[i]
            cur_ntok[v] += 1
