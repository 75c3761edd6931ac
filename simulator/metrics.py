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

The serving engines log their own figure, "balancedness" (mean over busiest GPU load, 1 = balanced), computed
per forward pass; moe-trace reports both next to its imbalance, from the same per-step GPU loads:

- SGLang balancedness (python/sglang/srt/eplb/expert_distribution.py, compute_utilization_rate): per step and
  layer (mean GPU load + 1e-5) / (busiest GPU load + 1e-5), averaged over the decoder layers, unweighted.
  SGLang's layer axis is every decoder layer (num_hidden_layers), so a dense layer, whose counts are zero,
  counts 1.0. Then the mean over steps (SGLang logs the mean over its last 10 / 100 / 1000 passes).
- vLLM balancedness (vllm/distributed/eplb/eplb_state.py, as corrected by vLLM PR 36304): per step, the mean
  GPU load summed over the MoE layers, over the busiest GPU load summed over them: exactly 1 / the step's own
  imbalance. Then the mean over steps (vLLM logs each step's value). Before PR 36304 vLLM reduced over the
  layer axis instead (sum over GPUs of each GPU's mean over layers, over the same of its max), which reads 1.0
  whenever every GPU's load is the same in each layer, however unequal the GPUs are; moe-trace does not report
  that version.
"""

from __future__ import annotations

from typing import TypeVar

import numpy as np

Load = TypeVar("Load", float, np.ndarray)  # one layer's GPU load figure, or an array of them

STEP_IMBALANCE = ("step imbalance: per step, the busiest GPU's load summed over layers, summed over steps, "
                  "over the same sum of the mean GPU's load (what sets step time)")
AGGREGATE_IMBALANCE = ("aggregate imbalance: the same with the whole scored part as one step (per layer, the "
                       "busiest GPU's total load; blind to the step size)")
STEP_PERCENTILE = "step p95: 95th percentile of each step's own imbalance"
SGLANG_BALANCEDNESS = ("SGLang balancedness: per step, each decoder layer's mean GPU load over its busiest "
                       "(a dense layer counts 1), averaged over layers, then over steps (1 = balanced)")
VLLM_BALANCEDNESS = ("vLLM balancedness (after its PR 36304): per step, the layer-summed mean GPU load over "
                     "the layer-summed busiest, i.e. 1 / the step's own imbalance, averaged over steps")
SGLANG_EPSILON = 1e-5  # SGLang adds it to both loads, so an idle layer reads 1.0


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


def sglang_layer_balancedness(mean_load: Load, peak_load: Load) -> Load:
    """SGLang's ratio for one layer of one step, (mean + 1e-5) / (busiest + 1e-5). Scalars or arrays alike;
    the replay kernel compiles this very function."""
    return (mean_load + SGLANG_EPSILON) / (peak_load + SGLANG_EPSILON)


def sglang_step_balancedness(layer_sums: np.ndarray, moe_layers: int, dense_layers: int) -> np.ndarray:
    """[steps] SGLang balancedness of each step from its sum over the MoE layers of sglang_layer_balancedness;
    the dense layers, which SGLang averages over too, each add 1.0."""
    dense = max(0, dense_layers)
    return (np.asarray(layer_sums, dtype=np.float64) + dense) / max(moe_layers + dense, 1)


def vllm_step_balancedness(step_imbalances: np.ndarray) -> np.ndarray:
    """[steps] vLLM balancedness of each step: its layer-summed mean GPU load over its layer-summed busiest,
    the reciprocal of the step's own imbalance."""
    imb = np.asarray(step_imbalances, dtype=np.float64)
    return np.divide(1.0, imb, out=np.ones_like(imb), where=imb > 0)


def mean_over_steps(per_step: np.ndarray) -> float:
    """A balancedness over the scored steps: the unweighted mean of each step's (NaN with no steps)."""
    values = np.asarray(per_step, dtype=np.float64)
    return float(values.mean()) if values.size else float("nan")
