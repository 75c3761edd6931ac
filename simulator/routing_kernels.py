"""Numba kernels of the routing analysis: one pass over a chunk's expert ids, no I/O.

The plain NumPy functions in routing_analysis.py (layer_expert_counts, coselection_counts, shared_experts) are
the reference these must match exactly (tests/test_routing_analysis.py). Shape legend: T tokens, L MoE layers,
K top-k, E experts, S trace segments, P token pairs.
"""

from __future__ import annotations

import numpy as np
from numba import njit


@njit(cache=True)
def count_chunk(ids: np.ndarray, phase: np.ndarray, segment: np.ndarray, phase_load: np.ndarray,
                segment_load: np.ndarray, coselection: np.ndarray) -> None:
    """Add one chunk's counts in place.

    ids: [T, L, K] expert ids (no repeats within a row); phase: [T] 0/1; segment: [T] segment index.
    phase_load: [2, L, E] += assignments; segment_load: [S, L, E] += assignments;
    coselection: [L, E, E] += tokens choosing both i and j (i != j, both orders); the diagonal is left alone.
    """
    t_count, l_count, k_count = ids.shape
    for t in range(t_count):
        p = phase[t]
        s = segment[t]
        for layer in range(l_count):
            for a in range(k_count):
                e = ids[t, layer, a]
                phase_load[p, layer, e] += 1
                segment_load[s, layer, e] += 1
                for b in range(a + 1, k_count):
                    f = ids[t, layer, b]
                    coselection[layer, e, f] += 1
                    coselection[layer, f, e] += 1


@njit(cache=True)
def shared_sum(ids_a: np.ndarray, ids_b: np.ndarray, prev: np.ndarray, cur: np.ndarray, num_experts: int,
               out: np.ndarray) -> None:
    """out[l] += experts that rows prev[p] of ids_a and cur[p] of ids_b have in common in layer l, over pairs
    p.

    ids_a, ids_b: [*, L, K]; prev, cur: [P] row indices; out: [L]. Marks row a's experts with a stamp unique
    to (pair, layer), then counts row b's marked experts: 2K steps instead of K^2 comparisons, no clearing.
    """
    _, l_count, k_count = ids_a.shape
    stamp = np.zeros(num_experts, dtype=np.int64)
    tag = 0
    for p in range(prev.shape[0]):
        i = prev[p]
        j = cur[p]
        for layer in range(l_count):
            tag += 1
            for a in range(k_count):
                stamp[ids_a[i, layer, a]] = tag
            n = 0
            for b in range(k_count):
                if stamp[ids_b[j, layer, b]] == tag:
                    n += 1
            out[layer] += n
