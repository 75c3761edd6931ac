"""Per-layer expert load figures from routing counts (pure NumPy, no I/O)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class LayerLoad:
    assignments: int  # token-expert assignments in this layer (tokens x top-k)
    busiest: int  # expert with the most assignments
    max_share: float  # busiest expert's share of the assignments
    imbalance: float  # max / mean assignments per expert (1.0 = perfectly even)
    idle: int  # experts that received no token


def layer_load(counts: np.ndarray) -> list[LayerLoad]:
    """counts: [L, E] assignments per expert. One LayerLoad per layer."""
    out = []
    for row in np.asarray(counts, dtype=np.int64):
        total = int(row.sum())
        mean = total / row.size if row.size else 0.0
        peak = int(row.max()) if row.size else 0
        out.append(LayerLoad(
            assignments=total,
            busiest=int(row.argmax()) if row.size else 0,
            max_share=peak / total if total else 0.0,
            imbalance=peak / mean if mean else 0.0,
            idle=int((row == 0).sum()),
        ))
    return out
