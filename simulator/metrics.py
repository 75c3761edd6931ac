"""Load imbalance: one definition of each figure, used by replay, rebalance, plan, the report and their JSON.

A GPU's load in a layer is the assignments it serves (an expert's load split evenly over its replicas).

- step imbalance (the headline): per step, the busiest GPU's load summed over layers; summed over the steps
  and divided by the same sum of the mean GPU's load. Step time is set by the busiest GPU within each step, so
  this is the figure that tracks step time; it is token-weighted (a step counts by its load) and changes with
  the step size.
- aggregate imbalance: the same ratio with the whole scored part taken as one step (per layer, the busiest
  GPU's total load). It is blind to how load moves between steps, so it does not change with the step size and
  is never above the step imbalance.
- per-step percentiles (p50 / p95 / p99): of each step's own ratio, unweighted.
"""

from __future__ import annotations

import numpy as np

STEP_IMBALANCE = ("step imbalance: per step, the busiest GPU's load summed over layers, summed over steps, "
                  "over the same sum of the mean GPU's load (what sets step time)")
AGGREGATE_IMBALANCE = ("aggregate imbalance: the same with the whole scored part as one step (per layer, the "
                       "busiest GPU's total load; blind to the step size)")
STEP_PERCENTILE = "step p95: 95th percentile of each step's own imbalance"


def ratio(peaks: float, means: float) -> float:
    """peaks / means, 1.0 (balanced) when nothing was served."""
    return float(peaks / means) if means > 0 else 1.0


def step_imbalance(step_peaks: np.ndarray, step_means: np.ndarray) -> float:
    """Step imbalance from per-step figures. step_peaks, step_means: [steps] layer-summed busiest / mean GPU
    load."""
    return ratio(float(np.sum(step_peaks)), float(np.sum(step_means)))


def aggregate_imbalance(gpu_load: np.ndarray) -> float:
    """Aggregate imbalance. gpu_load: [L, G] load of each GPU in each layer, summed over the scored steps."""
    load = np.asarray(gpu_load, dtype=np.float64)
    if load.size == 0:
        return 1.0
    return ratio(float(load.max(axis=1).sum()), float(load.mean(axis=1).sum()))
