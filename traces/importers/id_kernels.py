"""Numba kernels that check and convert imported expert ids in one pass, each with its plain NumPy reference.

Shape legend: T tokens, L MoE layers, K top-k, R recorder layers, K' recorded ids per token (K plus padding),
P physical experts.
"""

from __future__ import annotations

import numpy as np
from numba import njit

OK, OUT_OF_RANGE, TWICE = 0, 1, 2  # first_bad_id kinds
WRONG_COUNT, PAST_MAP = 1, 2  # physical_to_logical kinds


@njit(cache=True, nogil=True)
def first_bad_id(ids: np.ndarray, num_experts: int) -> tuple[int, int, int, int]:
    """The first (token, layer) row of ids [T, L, K] with an id outside 0..num_experts-1 (OUT_OF_RANGE, t,
    layer, position) or an expert chosen twice (TWICE, t, layer, 0); (OK, 0, 0, 0) when there is none.

    The range is checked first over the whole array (a branch-free min / max); up to 64 experts a row's ids
    are then bits of one word, and the row repeats an expert exactly when the sum of its bits differs from
    their OR. Otherwise (more experts, or an id out of range) rows are scanned in order, each expert
    remembering the last row that chose it."""
    tokens, layers, k = ids.shape
    flat = ids.reshape(-1)
    lo, hi = 0, 0
    if flat.size:
        lo, hi = flat[0], flat[0]
        for v in flat:
            lo = min(lo, v)
            hi = max(hi, v)
    if num_experts <= 64 and lo >= 0 and hi < num_experts:
        for t in range(tokens):
            for layer in range(layers):
                bits = np.uint64(0)
                total = np.uint64(0)
                for a in range(k):
                    bit = np.uint64(1) << np.uint64(ids[t, layer, a])
                    bits |= bit
                    total += bit
                if bits != total:
                    return TWICE, t, layer, 0
        return OK, 0, 0, 0
    seen = np.full(max(num_experts, 1), -1, dtype=np.int64)
    for t in range(tokens):
        for layer in range(layers):
            for a in range(k):
                v = ids[t, layer, a]
                if v < 0 or v >= num_experts:
                    return OUT_OF_RANGE, t, layer, a
            row = t * layers + layer
            for a in range(k):
                v = ids[t, layer, a]
                if seen[v] == row:
                    return TWICE, t, layer, 0
                seen[v] = row
    return OK, 0, 0, 0


def first_bad_id_numpy(ids: np.ndarray, num_experts: int) -> tuple[int, int, int, int]:
    """Plain reference of first_bad_id: whole-array masks, then the first bad row."""
    outside = (ids < 0) | (ids >= num_experts)  # [T, L, K]
    srt = np.sort(ids, axis=-1)
    twice = (srt[..., 1:] == srt[..., :-1]).any(-1)  # [T, L]
    bad = outside.any(-1) | twice
    if not bad.any():
        return OK, 0, 0, 0
    t, layer = (int(x) for x in np.argwhere(bad)[0])
    if outside[t, layer].any():
        return OUT_OF_RANGE, t, layer, int(np.flatnonzero(outside[t, layer])[0])
    return TWICE, t, layer, 0


@njit(cache=True, nogil=True)
def physical_to_logical(topk: np.ndarray, rows: np.ndarray, p2l: np.ndarray, k: int,
                        out: np.ndarray) -> tuple[int, int, int]:
    """Logical ids out [T, L, K] = p2l[rows[l], topk[rows[l], t, :k]] from recorded physical ids
    topk [R, T, K'] (a token's first k ids chosen, the rest -1 padding); p2l [R, P]. Reports the first
    (token, layer), in token order, whose first k are not all ids or whose padding is not -1 (WRONG_COUNT, t,
    l), or that names a physical expert past the map (PAST_MAP, t, l); (OK, 0, 0) when every row converts.
    Layer by layer (each layer's ids are contiguous), keeping each layer's first bad token."""
    tokens, pad = topk.shape[1], topk.shape[2]
    physical = p2l.shape[1]
    first_t, first_layer, first_kind = tokens, 0, OK
    for layer in range(rows.shape[0]):
        src = topk[rows[layer]]
        lut = p2l[rows[layer]]
        for t in range(min(tokens, first_t + 1)):
            wrong = False
            past = False
            for q in range(k):
                e = src[t, q]
                wrong |= e < 0
                past |= e >= physical
            for q in range(k, pad):
                wrong |= src[t, q] != -1
            if wrong or past:
                if t < first_t:
                    first_t, first_layer, first_kind = t, layer, WRONG_COUNT if wrong else PAST_MAP
                break
            for q in range(k):
                out[t, layer, q] = lut[src[t, q]]
    if first_kind != OK:
        return first_kind, first_t, first_layer
    return OK, 0, 0


def physical_to_logical_numpy(topk: np.ndarray, rows: np.ndarray, p2l: np.ndarray, k: int,
                              out: np.ndarray) -> tuple[int, int, int]:
    """Plain reference of physical_to_logical: masks over the whole pass, then one fancy index."""
    phys = topk[rows].transpose(1, 0, 2)  # [T, L, K']
    chosen, padding = phys[..., :k], phys[..., k:]
    wrong = (chosen < 0).any(-1) | (padding != -1).any(-1)
    past = (chosen >= p2l.shape[1]).any(-1)
    bad = wrong | past
    if bad.any():
        t, layer = (int(x) for x in np.argwhere(bad)[0])
        return (WRONG_COUNT if wrong[t, layer] else PAST_MAP), t, layer
    out[...] = p2l[rows[None, :, None], chosen]
    return OK, 0, 0
