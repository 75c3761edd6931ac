"""Numba kernels of the synthetic trace generator: pure computation over NumPy arrays, no I/O.

Shape legend: T rows (tokens) of a block, L MoE layers, E experts per layer, K top-k, C co-selection clusters,
M most experts in one cluster, B sequence slots (sequences in flight in one batch).

Randomness is counter-based (SplitMix64 of seed, global row and layer), so a row's routing depends only on the
seed, its place in the trace and its sequence's earlier rows: never on how the trace is cut into blocks. The
NumPy reference in tests/test_traces_synthetic.py draws the same numbers and must produce the same ids.
"""

from __future__ import annotations

import numpy as np
from numba import njit, prange

_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_MIX1 = np.uint64(0xBF58476D1CE4E5B9)
_MIX2 = np.uint64(0x94D049BB133111EB)
_S30 = np.uint64(30)
_S27 = np.uint64(27)
_S31 = np.uint64(31)
_S11 = np.uint64(11)
_S32 = np.uint64(32)
_LOW32 = np.uint64(0xFFFFFFFF)
_UNIT = 1.0 / 9007199254740992.0  # 2**-53
_UNIT32 = 1.0 / 4294967296.0  # 2**-32

SCORING_SOFTMAX = 0
SCORING_SIGMOID = 1


@njit(cache=True, inline="always")
def _mix(x: np.uint64) -> np.uint64:
    """SplitMix64 output function of state x (x already advanced by the golden ratio)."""
    z = x + _GOLDEN
    z = (z ^ (z >> _S30)) * _MIX1
    z = (z ^ (z >> _S27)) * _MIX2
    return z ^ (z >> _S31)


@njit(cache=True, inline="always")
def _stream(seed_key: np.uint64, row: int, lane: int, lanes: int) -> np.uint64:
    """Start of the random stream of one (row, lane); lane is a layer, or L for token-level draws."""
    return _mix(np.uint64(seed_key) ^ np.uint64(row * lanes + lane))


@njit(cache=True, inline="always")
def _unit(stream: np.uint64, i: int) -> float:
    """The i-th uniform in [0, 1) of a stream."""
    return float(_mix(stream + np.uint64(i) * _GOLDEN) >> _S11) * _UNIT


@njit(cache=True, inline="always")
def _unit_pair(stream: np.uint64, i: int) -> tuple[float, float]:
    """Two uniforms in [0, 1) with 32-bit resolution from the i-th number of a stream."""
    x = _mix(stream + np.uint64(i) * _GOLDEN)
    return float(x >> _S32) * _UNIT32, float(x & _LOW32) * _UNIT32


@njit(cache=True, inline="always")
def _alias_draw(prob: np.ndarray, alias: np.ndarray, n: int, v: float) -> int:
    """Walker/Vose alias sampling: index j < n with probability given by the table, from one uniform v."""
    x = v * n
    j = min(int(x), n - 1)
    return j if x - j < prob[j] else alias[j]


@njit(cache=True)
def seed_key(seed: int) -> np.uint64:
    return _mix(np.uint64(seed))


@njit(cache=True, parallel=True)
def route_rows(
    row0: int,
    key: np.uint64,
    slot: np.ndarray,  # [T] int64 sequence slot of each row
    position: np.ndarray,  # [T] int32, 0 starts a sequence (its state is reset)
    pop: np.ndarray,  # [L, E] float64 expert popularity per layer, rows sum to 1, all > 0
    pop_prob: np.ndarray,  # [L, E] alias table of pop: acceptance probabilities
    pop_alias: np.ndarray,  # [L, E] int64 alias table of pop: alternatives
    cluster_of: np.ndarray,  # [L, E] int64 cluster of each expert
    members: np.ndarray,  # [L, C, M] int64 experts of each cluster (padded)
    member_prob: np.ndarray,  # [L, C, M] alias table of popularity within the cluster
    member_alias: np.ndarray,  # [L, C, M] int64 (indices into members)
    member_count: np.ndarray,  # [L, C] int64
    cluster_mass: np.ndarray,  # [L, C] pop summed over the cluster
    w_cluster: float,  # mixture weight of the token's topic cluster
    w_sticky: float,  # mixture weight of the sequence's previous token's experts (same layer)
    topic_switch: float,  # per-token probability that a sequence changes topic
    noise_odds: np.ndarray,  # [N] exp(noise) at N equally likely quantiles of the router weight noise
    scoring: int,  # SCORING_SOFTMAX or SCORING_SIGMOID
    norm_topk: bool,
    scale: float,  # routed_scaling_factor
    vocab_size: int,
    num_groups: int,  # group-limited routing: experts in this many groups of E / num_groups (1: none)
    topk_groups: int,  # a token's K experts come from at most this many groups
    topic: np.ndarray,  # [B] int64 state: current topic of each slot
    prev: np.ndarray,  # [B, L, K] int64 state: previous token's experts of each slot
    has_prev: np.ndarray,  # [B] bool state
    out_ids: np.ndarray,  # [T, L, K] uint8/uint16
    out_weights: np.ndarray,  # [T, L, K] float32
    out_tokens: np.ndarray,  # [T] int32
) -> None:
    """Route T rows: K distinct experts per layer, drawn from a per-token mixture, weights in router order.

    With num_groups > 1 (DeepSeek-V3: 8 groups of 32, 4 per token) the groups of the first experts drawn are
    the token's groups: once topk_groups groups are in use, a draw from any other group is drawn again, so
    every token's experts span at most topk_groups groups, the groups its strongest preferences fall in.
    Sequences are independent, so slots run in parallel; each slot walks its own rows in order.
    """
    for s in prange(topic.shape[0]):
        _route_slot(s, row0, key, slot, position, pop, pop_prob, pop_alias, cluster_of, members, member_prob,
                    member_alias, member_count, cluster_mass, w_cluster, w_sticky, topic_switch, noise_odds,
                    scoring, norm_topk, scale, vocab_size, num_groups, topk_groups, topic, prev, has_prev,
                    out_ids, out_weights, out_tokens)


@njit(cache=True)
def _route_slot(s, row0, key, slot, position, pop, pop_prob, pop_alias, cluster_of, members, member_prob,
                member_alias, member_count, cluster_mass, w_cluster, w_sticky, topic_switch, noise_odds,
                scoring, norm_topk, scale, vocab_size, num_groups, topk_groups, topic, prev, has_prev,
                out_ids, out_weights, out_tokens):
    """The rows of slot s (parameters as in route_rows; every cluster has at least one member)."""
    num_rows = slot.shape[0]
    num_layers, num_experts = pop.shape
    k = out_ids.shape[2]
    num_clusters = members.shape[1]
    num_odds = noise_odds.shape[0]
    lanes = num_layers + 1
    chosen = np.empty(k, np.int64)
    q = np.empty(k, np.float64)
    used = np.zeros(num_experts, np.bool_)  # chosen at the current (row, layer); cleared after it
    prev_hits = np.zeros(num_experts, np.int64)  # times each expert is in the previous token's top-k
    group_size = num_experts // num_groups
    group_used = np.zeros(num_groups, np.bool_)  # groups of the experts chosen at the current (row, layer)
    for t in range(num_rows):
        if slot[t] != s:
            continue
        row = row0 + t
        c = _stream(key, row, num_layers, lanes)
        if position[t] == 0:
            has_prev[s] = False
            topic[s] = int(_unit(c, 0) * num_clusters)
        elif _unit(c, 0) < topic_switch:
            topic[s] = int(_unit(c, 1) * num_clusters)
        out_tokens[t] = int(_unit(c, 2) * vocab_size)
        tp = topic[s]
        sticky = w_sticky if has_prev[s] else 0.0
        w_cl = w_cluster + (w_sticky - sticky)  # a first token gives the sticky share to its topic
        w_gl = 1.0 - sticky - w_cl
        for layer in range(num_layers):
            c = _stream(key, row, layer, lanes)
            i = 0
            n = 0
            attempts = 0
            groups_in_use = 0
            while n < k:
                u, v = _unit_pair(c, i)
                i += 1
                if u < sticky:
                    e = prev[s, layer, min(int(v * k), k - 1)]
                elif u < sticky + w_cl:
                    m = member_count[layer, tp]
                    e = members[layer, tp, _alias_draw(member_prob[layer, tp], member_alias[layer, tp], m, v)]
                else:
                    e = _alias_draw(pop_prob[layer], pop_alias[layer], num_experts, v)
                closed = num_groups > 1 and groups_in_use >= topk_groups and not group_used[e // group_size]
                # sampling without replacement (and within the token's groups): draw again
                if used[e] or closed:
                    attempts += 1
                    if attempts < 64 * k:
                        continue
                    e = _most_popular_unused(pop[layer], used, group_used, groups_in_use >= topk_groups,
                                             group_size)  # never reached in practice
                used[e] = True
                if not group_used[e // group_size]:
                    group_used[e // group_size] = True
                    groups_in_use += 1
                chosen[n] = e
                n += 1
            # Router weights: mixture probability of each chosen expert, perturbed by logistic noise.
            total_q = 0.0
            total_p = 0.0
            if sticky > 0.0:
                for j in range(k):
                    prev_hits[prev[s, layer, j]] += 1
            group_used[:] = False
            for j in range(k):
                e = chosen[j]
                used[e] = False
                p = w_gl * pop[layer, e]
                if cluster_of[layer, e] == tp:
                    p += w_cl * pop[layer, e] / cluster_mass[layer, tp]
                if sticky > 0.0:
                    p += sticky * prev_hits[e] / k
                u, _ = _unit_pair(c, i)
                i += 1
                odds = noise_odds[min(int(u * num_odds), num_odds - 1)]
                if scoring == SCORING_SOFTMAX:
                    q[j] = p * odds
                else:  # sigmoid of a logit that is 0 for an expert of average popularity
                    q[j] = 1.0 / (1.0 + 1.0 / (p * num_experts * odds))
                total_q += q[j]
                total_p += p
            if sticky > 0.0:
                for j in range(k):
                    prev_hits[prev[s, layer, j]] = 0
            if scoring == SCORING_SOFTMAX and not norm_topk:
                denom = total_q + max(0.0, 1.0 - total_p)  # unchosen experts keep their mixture mass
            elif norm_topk:
                denom = total_q
            else:
                denom = 1.0
            # Router order: descending weight (insertion sort, stable).
            for j in range(1, k):
                qj = q[j]
                ej = chosen[j]
                j2 = j - 1
                while j2 >= 0 and q[j2] < qj:
                    q[j2 + 1] = q[j2]
                    chosen[j2 + 1] = chosen[j2]
                    j2 -= 1
                q[j2 + 1] = qj
                chosen[j2 + 1] = ej
            for j in range(k):
                out_ids[t, layer, j] = chosen[j]
                out_weights[t, layer, j] = q[j] / denom * scale
                prev[s, layer, j] = chosen[j]
        has_prev[s] = True


@njit(cache=True)
def _most_popular_unused(pop_row: np.ndarray, used: np.ndarray, group_used: np.ndarray, groups_closed: bool,
                         group_size: int) -> np.int64:
    """The most popular expert not chosen yet, from the token's groups once they are all in use."""
    best = -1
    for e in range(pop_row.shape[0]):
        allowed = not groups_closed or group_used[e // group_size]
        if allowed and not used[e] and (best < 0 or pop_row[e] > pop_row[best]):
            best = e
    return np.int64(best)


def noise_odds_table(noise_scale: float, size: int = 4096) -> np.ndarray:
    """exp(noise_scale * X) at `size` equally likely quantiles of a standard logistic X (a lookup beats
    pow)."""
    u = (np.arange(size) + 0.5) / size
    return np.exp(noise_scale * np.log(u / (1.0 - u)))


def alias_table(weights: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Vose's alias table of a positive weight vector [n]: (prob[n] float64, alias[n] int64).

    Draw: j = floor(v * n); keep j if frac(v * n) < prob[j], else take alias[j]. Exact up to rounding.
    """
    n = len(weights)
    scaled = np.asarray(weights, dtype=np.float64) * n / float(np.sum(weights))
    prob = np.ones(n)
    alias = np.arange(n, dtype=np.int64)
    small = [j for j in range(n) if scaled[j] < 1.0]
    large = [j for j in range(n) if scaled[j] >= 1.0]
    while small and large:
        j, g = small.pop(), large.pop()
        prob[j] = scaled[j]
        alias[j] = g
        scaled[g] -= 1.0 - scaled[j]
        (small if scaled[g] < 1.0 else large).append(g)
    return prob, alias  # leftovers (rounding) keep prob 1
