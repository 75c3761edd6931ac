"""Numba replay kernels over plain arrays (no I/O): route each token's top-k experts to physical slots of
several placements at once, count per step, and price each finished step on several GPU types.

Shape legend: T tokens in a chunk, L MoE layers, K top-k, E experts, V placements ("variants"), H hardware
specs, G GPUs (padded to the largest variant's), S slots per GPU, M = G*S slots, N nodes.

Per-step accumulator of one variant: acc [L, W] int64 with W = M + 2G + 2N columns:
  [0, M)            assignments per physical slot (slot = gpu * S + s)
  [M, M+G)          scale-up sends per GPU: unique (token, destination GPU) pairs inside the source's node
  [M+G, M+2G)       scale-up receives per GPU
  [M+2G, M+2G+N)    scale-out sends per node: unique (token, destination node) pairs, destination is not
                    the source node
  [M+2G+N, W)       scale-out receives per node
Replica rule: a token's source GPU is (global token index) mod G. If the source GPU holds a replica of the
expert, that replica serves it; otherwise replica number ((token index) div G) mod (replica count), which
spreads every source GPU's tokens evenly over the replicas.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import cast

import numpy as np
from numba import njit

from simulator.metrics import sglang_layer_balancedness
from simulator.profiles import GRID_LOG2_ASSIGNMENTS, GRID_LOG2_EXPERTS, GRID_ROWS
from traces.errors import InputError

# Columns of the cost array, one row per hardware spec: effective FLOP/s, effective HBM bytes/s, effective
# scale-up bytes/s for dispatch and combine, effective scale-out bytes/s per NIC for dispatch and combine,
# latencies (s).
C_FLOPS, C_HBM, C_SU_DISPATCH, C_SU_COMBINE, C_SO_DISPATCH, C_SO_COMBINE, C_SU_LAT, C_SO_LAT = range(8)
# A measured profile (expert_time.py) adds: a flag (1: price expert work from the profile, 0: roofline), the
# tile of rows, the fixed and per-assignment seconds, then the grouped-GEMM table as log2 seconds, row-major
# [PROFILE_NX (log2 experts 0..8), PROFILE_NW (rows 1, 2, 3, 4, 6, 8, 12, ... 98304, 131072:
# profiles.GRID_ROWS)].
C_PROFILED, C_TILE, C_FIXED, C_PER_ASSIGN, C_TABLE = 8, 9, 10, 11, 12
PROFILE_NX, PROFILE_NW = len(GRID_LOG2_EXPERTS), len(GRID_ROWS)
PROFILE_LOG2_ROWS = np.log2(np.asarray(GRID_ROWS, dtype=np.float64))  # [PROFILE_NW], not evenly spaced
# Then G(x, x tile) for x = 0 .. SMALL_MAX: the GEMM time when every local expert has at most one tile of rows
# (all decode-sized steps), looked up instead of interpolated, which keeps replay's speed.
C_SMALL = C_TABLE + PROFILE_NX * PROFILE_NW
SMALL_MAX = 256
# Then the measured non-GEMM work R(a): a flag (1: present) and log2 seconds at a = 2^0 .. 2^(PROFILE_NA - 1).
C_OVERHEAD = C_SMALL + SMALL_MAX + 1
PROFILE_NA = len(GRID_LOG2_ASSIGNMENTS)
# Then R(a) in seconds for a = 0 .. SMALL_MAX, the kernel's own interpolation tabulated (decode-sized steps
# look it up instead of taking a log and a power for every GPU, layer and step).
C_OVERHEAD_SMALL = C_OVERHEAD + 1 + PROFILE_NA
NUM_COST_COLUMNS = C_OVERHEAD_SMALL + SMALL_MAX + 1
# Entries of the model array: FLOPs per assignment, bytes of one expert's weights, bytes sent per token copy
# in dispatch and in combine, capacity factor (<= 0: no capacity limit), top-k.
M_FLOPS, M_EXPERT_BYTES, M_DISPATCH_BYTES, M_COMBINE_BYTES, M_CAPACITY_FACTOR, M_TOP_K = range(6)
NUM_MODEL_ENTRIES = 6
# Time components, in this order everywhere: expert compute, expert weight reads, dispatch, combine.
COMPONENTS = ("compute", "weights", "dispatch", "combine")
# Integer totals per variant and layer (tot_int [V, L, 8]).
I_LEAVE_GPU, I_LEAVE_NODE, I_SU_PAIRS, I_SO_PAIRS, I_DROPPED, I_ACTIVE, I_PEAK, I_STEPS = range(8)
NUM_INT_TOTALS = 8


# the one definition, compiled for the kernel
_sglang_layer = cast(Callable[[float, float], float],
                     njit(cache=True, inline="always")(sglang_layer_balancedness))

_WORKERS = [0]  # threads run_variants replays shards of the trace on; 0: every core this process may use


def available_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def set_workers(workers: int | None) -> int:
    """Threads replay spreads its shards of the trace over: `workers`, or every core when None or 0. Returns
    the number in use. Results do not depend on it (the shards are fixed by the trace, not by the thread
    count)."""
    limit = available_cores()
    n = limit if not workers else int(workers)
    if n < 1 or n > limit:
        raise InputError(f"--workers must be 1 to {limit} (the cores this process may use), got {workers}")
    _WORKERS[0] = 0 if not workers else n
    return n


def workers() -> int:
    return _WORKERS[0] or available_cores()


@njit(cache=True)
def step_key(phase: int, sel_in_phase: int, recorded_step: int, tokens_per_step: int) -> int:
    """Key of the step a token belongs to; a step is a run of consecutive scored tokens sharing one key.

    Regrouped steps (tokens_per_step > 0) count tokens per phase, so prefill and decode never share a step.
    """
    if tokens_per_step > 0:
        return phase * (1 << 40) + sel_in_phase // tokens_per_step
    return recorded_step


@njit(cache=True, inline="always")
def scored_step_key(ph: int, t: int, step: int, sel_count: np.ndarray, phase_filter: int, score_start: int,
                    variant_phase: int, tokens_per_step: int) -> tuple[bool, int]:
    """Whether token t (phase ph, recorded step) is scored for a variant, and its step's key. Counts it into
    sel_count [2] when the pass scores it, also for a variant that scores only the other phase."""
    if (phase_filter >= 0 and ph != phase_filter) or t < score_start:
        return False, 0
    sel = sel_count[ph]
    sel_count[ph] += 1
    if variant_phase >= 0 and ph != variant_phase:
        return False, 0
    return True, step_key(ph, sel, step, tokens_per_step)


@njit(cache=True, inline="always")
def profiled_expert_seconds(row: np.ndarray, experts: int, rows: float, assignments: float) -> float:
    """One GPU's expert time in one layer from a profile row (expert_time.expert_seconds is the NumPy twin):
    fixed + per-assignment x a + R(a) + G(x, W), G bilinear on log2 seconds in (log2 x, log2 W), proportional
    past the grid.
    """
    t = row[C_FIXED] + row[C_PER_ASSIGN] * assignments
    if row[C_OVERHEAD] > 0:
        if assignments <= SMALL_MAX:
            t += row[C_OVERHEAD_SMALL + int(assignments)]
        else:
            t += profiled_overhead_seconds(row, assignments)
    if experts <= 0:
        return t
    if experts <= SMALL_MAX and rows == experts * row[C_TILE]:
        return t + row[C_SMALL + experts]
    return t + profiled_gemm_seconds(row, experts, rows)


@njit(cache=True, inline="always")
def profiled_overhead_seconds(row: np.ndarray, assignments: float) -> float:
    """R(a) from the profile row: log-log between grid points, proportional past the last (expert_time's
    overhead_lookup is the NumPy twin)."""
    la = np.log2(max(assignments, 1.0))
    b = C_OVERHEAD + 1
    if la >= PROFILE_NA - 1:
        return 2.0 ** row[b + PROFILE_NA - 1] * assignments / 2.0 ** (PROFILE_NA - 1)
    i = int(la)
    u = la - i
    return 2.0 ** ((1 - u) * row[b + i] + u * row[b + i + 1])


@njit(cache=True)
def profiled_gemm_seconds(row: np.ndarray, experts: int, rows: float) -> float:
    """G(x, W) by interpolation in the profile row's table (expert_time.gemm_lookup is the NumPy twin)."""
    lx = np.log2(experts)
    lw = np.log2(max(rows, 1.0))
    scale = 1.0
    if lx > PROFILE_NX - 1:
        scale *= experts / 2.0 ** (PROFILE_NX - 1)
        lx = PROFILE_NX - 1.0
    top = PROFILE_LOG2_ROWS[PROFILE_NW - 1]
    if lw > top:
        scale *= rows / 2.0**top
        lw = top
    i = min(int(lx), PROFILE_NX - 2)
    j = min(int(np.searchsorted(PROFILE_LOG2_ROWS, lw, side="right")) - 1, PROFILE_NW - 2)
    u = lx - i
    v = (lw - PROFILE_LOG2_ROWS[j]) / (PROFILE_LOG2_ROWS[j + 1] - PROFILE_LOG2_ROWS[j])
    b = C_TABLE + i * PROFILE_NW + j
    log_t = ((1 - u) * (1 - v) * row[b] + u * (1 - v) * row[b + PROFILE_NW] + (1 - u) * v * row[b + 1]
             + u * v * row[b + PROFILE_NW + 1])
    return scale * 2.0 ** log_t


@njit(cache=True)
def price_step(acc: np.ndarray, ntok: int, num_gpus: int, slots_per_gpu: int, gpus_per_node: int,
               used_slots: int, model: np.ndarray, cost: np.ndarray, comp: np.ndarray, tot_int: np.ndarray,
               tot_gpu: np.ndarray, step_time: np.ndarray) -> tuple[float, float]:
    """Price one finished step of one variant; return its load imbalance (sum of layer max / sum of layer
    mean) and its sum over layers of SGLang's per-layer balancedness (simulator.metrics).

    acc [L, W] counts as in the module docstring; model [6]; cost [H, NUM_COST_COLUMNS].
    Adds seconds into comp [H, L, 4], dropped / active slots / busiest-GPU assignments / steps into
    tot_int [L, 8] and assignments per GPU into tot_gpu [L, G]; writes step_time [H] seconds.
    Per layer: the slowest GPU's expert time, plus dispatch and combine, each the slower tier's max(send,
    receive) bytes over its effective bandwidth plus that tier's latency. Expert time is the measured
    profile's (profiled_expert_seconds) where the cost row has one, else the roofline max(FLOPs / FLOP/s,
    weight bytes / HBM B/s); either way it is booked as compute or weights by which roofline term is the
    larger.
    """
    layers = acc.shape[0]
    m = num_gpus * slots_per_gpu
    num_nodes = max(1, num_gpus // gpus_per_node)
    n_hw = cost.shape[0]
    cap = np.inf
    if model[M_CAPACITY_FACTOR] > 0:
        # One physical slot may take cf x (the step's assignments) / (slots holding an expert), rounded up.
        cap = np.ceil(model[M_CAPACITY_FACTOR] * ntok * model[M_TOP_K] / used_slots)
    step_time[:] = 0.0
    t_expert = np.zeros(n_hw)
    compute_bound = np.zeros(n_hw, dtype=np.bool_)
    padded = np.zeros(n_hw)  # a GPU's rows rounded up to each profile's tile
    any_profile = False
    n_tiles = 1
    for h in range(n_hw):
        if cost[h, C_PROFILED] > 0:
            any_profile = True
            if cost[h, C_TILE] != cost[0, C_TILE] or cost[0, C_PROFILED] <= 0:
                n_tiles = n_hw
    sum_max = 0.0
    sum_mean = 0.0
    sglang_sum = 0.0
    for layer in range(layers):
        row = acc[layer]
        t_expert[:] = 0.0
        gpu_max = 0
        total = 0
        for g in range(num_gpus):
            a_raw = 0
            a_kept = 0.0
            act = 0
            if any_profile:
                padded[:] = 0.0
            for s in range(slots_per_gpu):
                c = row[g * slots_per_gpu + s]
                if c > 0:
                    act += 1
                    a_raw += c
                    kept = min(float(c), cap)
                    a_kept += kept
                    tot_int[layer, I_DROPPED] += c - int(kept)
                    if any_profile:
                        for h in range(n_tiles):  # one pass when every profile has the same tile
                            tile = cost[h, C_TILE]
                            if tile > 0:
                                padded[h] += np.ceil(kept / tile) * tile
            tot_int[layer, I_ACTIVE] += act
            tot_gpu[layer, g] += a_raw
            total += a_raw
            gpu_max = max(gpu_max, a_raw)
            flops = a_kept * model[M_FLOPS]
            wbytes = act * model[M_EXPERT_BYTES]
            for h in range(n_hw):
                tc = flops / cost[h, C_FLOPS]
                tw = wbytes / cost[h, C_HBM]
                t_gpu = max(tc, tw)
                if cost[h, C_PROFILED] > 0:
                    t_gpu = profiled_expert_seconds(cost[h], act, padded[h if n_tiles > 1 else 0], a_kept)
                if t_gpu > t_expert[h]:
                    t_expert[h] = t_gpu
                    compute_bound[h] = tc >= tw
        tot_int[layer, I_PEAK] += gpu_max
        tot_int[layer, I_STEPS] += 1
        sum_max += gpu_max
        sum_mean += total / num_gpus
        sglang_sum += _sglang_layer(total / num_gpus, float(gpu_max))
        su_max = 0
        for g in range(num_gpus):
            su_max = max(su_max, row[m + g], row[m + num_gpus + g])
        so_max = 0
        for n in range(num_nodes):
            so_max = max(so_max, row[m + 2 * num_gpus + n], row[m + 2 * num_gpus + num_nodes + n])
        for h in range(n_hw):
            disp = 0.0
            comb = 0.0
            if su_max > 0:
                disp = su_max * model[M_DISPATCH_BYTES] / cost[h, C_SU_DISPATCH] + cost[h, C_SU_LAT]
                comb = su_max * model[M_COMBINE_BYTES] / cost[h, C_SU_COMBINE] + cost[h, C_SU_LAT]
            if so_max > 0:
                # A node's scale-out traffic is spread over its gpus_per_node NICs (rail-optimised, as in
                # DeepEP).
                per_nic = so_max / gpus_per_node
                disp = max(disp, per_nic * model[M_DISPATCH_BYTES] / cost[h, C_SO_DISPATCH]
                           + cost[h, C_SO_LAT])
                comb = max(comb, per_nic * model[M_COMBINE_BYTES] / cost[h, C_SO_COMBINE] + cost[h, C_SO_LAT])
            comp[h, layer, 0 if compute_bound[h] else 1] += t_expert[h]
            comp[h, layer, 2] += disp
            comp[h, layer, 3] += comb
            step_time[h] += t_expert[h] + disp + comb
    if sum_mean <= 0:
        return 1.0, sglang_sum
    return sum_max / sum_mean, sglang_sum


@njit(cache=True, nogil=True)
def replay_chunk(ids: np.ndarray, steps: np.ndarray, phases: np.ndarray, t0: int, phase_filter: int,
                 score_start: int, var_gpus: np.ndarray, var_slots: np.ndarray, var_gpn: np.ndarray,
                 var_tps: np.ndarray, var_used: np.ndarray, var_phase: np.ndarray, rep_count: np.ndarray,
                 rep_slot: np.ndarray, local_slot: np.ndarray, slot_gpu: np.ndarray, model: np.ndarray,
                 cost: np.ndarray, sel_count: np.ndarray, cur_key: np.ndarray, cur_ntok: np.ndarray,
                 acc: np.ndarray,
                 fresh: np.ndarray, head_key: np.ndarray, head_ntok: np.ndarray, head_acc: np.ndarray,
                 tot_gpu: np.ndarray, tot_int: np.ndarray, comp: np.ndarray,
                 out_imb: np.ndarray, out_sglang: np.ndarray, out_time: np.ndarray, out_ntok: np.ndarray,
                 out_n: np.ndarray) -> None:
    """Route one chunk of tokens for every variant; price each step as it closes. Holds no GIL, so
    run_variants replays shards of the trace on several threads at once.

    ids [T, L, K]; steps, phases [T]; t0: global index of the chunk's first token. A token is scored when its
    phase matches phase_filter (-1: both) and its global index >= score_start.
    Variant v: var_gpus, var_slots, var_gpn, var_tps (tokens per step, 0 = recorded steps), var_used (slots
    holding an expert), var_phase (-1: every scored token; else only that phase's, so one pass can replay
    prefill and decode apart) [V]; rep_count [V, L, E]; rep_slot [V, L, E, R] slot index of each replica;
    local_slot [V, L, E, G] the slot of expert e on GPU g (-1: none there); slot_gpu [V, M] the GPU of each
    slot (lookups, not divisions, in the inner loop). model [6], cost [H, 8].
    State carried from chunk to chunk: sel_count [2] scored tokens per phase; cur_key, cur_ntok [V] and
    acc [V, L, W] (the open step); fresh [V] (1 until the segment's first step closes) and head_key, head_ntok
    [V], head_acc [V, L, W]: a segment's first step is kept unpriced, because it may continue a step from the
    segment before it (replay.Segment.merge).
    Totals: tot_gpu [V, L, G] assignments per GPU (added when a step is priced); tot_int [V, L, 8] (I_*
    columns); comp [V, H, L, 4] seconds.
    Per closed step: out_imb [V, T + 1], out_sglang [V, T + 1] (price_step's layer sum),
    out_time [V, H, T + 1], out_ntok [V, T + 1]; out_n [V] counts them.
    """
    n_tok, layers, top_k = ids.shape
    n_var = var_gpus.shape[0]
    g_max = tot_gpu.shape[2]
    mark_gpu = -np.ones(g_max, dtype=np.int64)  # stamp of the last (token, layer, variant) sent to each GPU
    mark_node = -np.ones(g_max, dtype=np.int64)  # ... and to each node (nodes <= GPUs)
    step_time = np.zeros(cost.shape[0])
    sel_start = sel_count.copy()
    # Variant-outer: each variant's counters stay in cache while it walks the chunk.
    for v in range(n_var):
        sel_count[:] = sel_start
        g_count = var_gpus[v]
        gpn = var_gpn[v]
        m = g_count * var_slots[v]
        n_nodes = max(1, g_count // gpn)
        for i in range(n_tok):
            t = t0 + i
            scored, key = scored_step_key(phases[i], t, steps[i], sel_count, phase_filter, score_start,
                                          var_phase[v], var_tps[v])
            if not scored:
                continue
            if key != cur_key[v]:
                if cur_ntok[v] > 0:
                    if fresh[v]:
                        head_key[v] = cur_key[v]
                        head_ntok[v] = cur_ntok[v]
                        head_acc[v] = acc[v]
                        fresh[v] = 0
                    else:
                        c = out_n[v]
                        out_imb[v, c], out_sglang[v, c] = price_step(
                            acc[v], cur_ntok[v], g_count, var_slots[v], gpn, var_used[v], model, cost,
                            comp[v], tot_int[v], tot_gpu[v], step_time)
                        out_time[v, :, c] = step_time
                        out_ntok[v, c] = cur_ntok[v]
                        out_n[v] = c + 1
                    acc[v] = 0
                cur_key[v] = key
                cur_ntok[v] = 0
            cur_ntok[v] += 1
            src = t % g_count
            src_node = src // gpn
            rr = t // g_count
            su_send = m + src
            so_send = m + 2 * g_count + src_node
            for layer in range(layers):
                stamp = (t * layers + layer) * n_var + v
                leave_gpu = 0
                leave_node = 0
                su_pairs = 0
                so_pairs = 0
                for k in range(top_k):
                    e = ids[i, layer, k]
                    slot = local_slot[v, layer, e, src]
                    if slot >= 0:  # served on the source GPU: no traffic
                        acc[v, layer, slot] += 1
                        continue
                    n_rep = rep_count[v, layer, e]
                    slot = rep_slot[v, layer, e, 0] if n_rep == 1 else rep_slot[v, layer, e, rr % n_rep]
                    acc[v, layer, slot] += 1
                    g = slot_gpu[v, slot]
                    node = g // gpn
                    leave_gpu += 1
                    if node == src_node:
                        if mark_gpu[g] != stamp:
                            mark_gpu[g] = stamp
                            acc[v, layer, m + g_count + g] += 1
                            su_pairs += 1
                    else:
                        leave_node += 1
                        if mark_node[node] != stamp:
                            mark_node[node] = stamp
                            acc[v, layer, m + 2 * g_count + n_nodes + node] += 1
                            so_pairs += 1
                acc[v, layer, su_send] += su_pairs
                acc[v, layer, so_send] += so_pairs
                tot_int[v, layer, I_SU_PAIRS] += su_pairs
                tot_int[v, layer, I_SO_PAIRS] += so_pairs
                tot_int[v, layer, I_LEAVE_GPU] += leave_gpu
                tot_int[v, layer, I_LEAVE_NODE] += leave_node


@njit(cache=True)
def count_load(ids: np.ndarray, phases: np.ndarray, t0: int, phase_filter: int, stop: int,
               load: np.ndarray, cosel: np.ndarray, with_cosel: bool) -> None:
    """Fit statistics over tokens with global index < stop: load [L, E] and co-selection cosel [L, E, E].

    ids [T, L, K]; cosel[l, a, b] counts tokens that chose both a and b at layer l (a != b).
    """
    n_tok, layers, top_k = ids.shape
    for i in range(min(n_tok, stop - t0)):
        if phase_filter >= 0 and phases[i] != phase_filter:
            continue
        for layer in range(layers):
            for k in range(top_k):
                a = ids[i, layer, k]
                load[layer, a] += 1
                if with_cosel:
                    for q in range(k + 1, top_k):
                        b = ids[i, layer, q]
                        cosel[layer, a, b] += 1
                        cosel[layer, b, a] += 1
