"""Plain NumPy reference of the traffic kernel (kernels.traffic_chunk), written from its docstring: whole
arrays, one placement, sets instead of stamps. The tests compare the two on random traces.

Shape legend: T tokens, L layers, K top-k, G GPUs, S slots per GPU.
"""

from __future__ import annotations

import numpy as np

from simulator.placement import Placement


def _pairs(hub: int, gpus: set[int], gpn: int) -> tuple[int, int]:
    others = gpus - {hub}
    su = sum(1 for g in others if g // gpn == hub // gpn)
    so = len({g // gpn for g in others if g // gpn != hub // gpn})
    return su, so


def reference_traffic(ids: np.ndarray, steps: np.ndarray, phases: np.ndarray, placement: Placement, *,
                      stay: bool, tokens_per_step: int = 0) -> dict[str, np.ndarray | float | int]:
    """Pairs [L, 4] (su dispatch, so dispatch, su combine, so combine), step imbalance, steps and tokens for
    every token of ids [T, L, K] on one placement."""
    layers, g_count, s_count = placement.slots.shape
    gpn = min(placement.gpus_per_node, g_count)
    n_tok, _, top_k = ids.shape
    pairs = np.zeros((layers, 4), dtype=np.int64)
    if tokens_per_step > 0:
        within = np.zeros(n_tok, dtype=np.int64)
        for p in (0, 1):
            mask = phases == p
            within[mask] = np.arange(mask.sum())
        keys = [(int(p), int(w) // tokens_per_step) for p, w in zip(phases, within, strict=True)]
    else:
        keys = [(0, int(s)) for s in steps]
    step_load: dict[tuple[int, int], np.ndarray] = {}
    for t in range(n_tok):
        home = t % g_count
        src = home
        load = step_load.setdefault(keys[t], np.zeros((layers, g_count), dtype=np.int64))
        for layer in range(layers):
            flat = placement.slots[layer].ravel()
            served = []
            for k in range(top_k):
                e = ids[t, layer, k]
                holders = np.flatnonzero(flat == e)  # slots in order
                on_src = holders[holders // s_count == src]
                slot = on_src[0] if on_src.size else holders[(t // g_count) % holders.size]
                served.append(int(slot // s_count))
                load[layer, slot // s_count] += 1
            su, so = _pairs(src, set(served), gpn)
            dest = served[0] if stay and layer + 1 < layers else home
            csu, cso = _pairs(dest, set(served) | {src}, gpn)
            pairs[layer] += (su, so, csu, cso)
            src = dest
    peaks = sum(float(v.max(axis=1).sum()) for v in step_load.values())
    means = sum(float(v.mean(axis=1).sum()) for v in step_load.values())
    return {"pairs": pairs, "step_imbalance": peaks / means if means else 1.0, "steps": len(step_load),
            "tokens": n_tok}
