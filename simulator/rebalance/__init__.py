"""Rebalance windows: how often should a deployment refit its expert placement?

Online expert-parallel servers (vLLM's and SGLang's EPLB) count expert load over a sliding window of recent
forward passes and periodically refit the placement. This module replays that on a trace: every W steps the
placement is refitted from the last N steps' load and then scored on the steps that follow, until the next
refit. Two baselines are scored on exactly the same steps:

- fixed: fitted once on the first N steps (the warm-up window, never scored) and kept for the whole trace;
- oracle: for each interval of W scored steps, fitted on those very steps (the best a refit could do, with
  hindsight).

Each schedule is scored by simulator.metrics' step imbalance (per step, the layer-summed busiest GPU's load;
summed over the scored steps, over the same sum of the mean GPU's), with each expert's load split evenly among
its replicas (as `placement.expected_gpu_load`). Each refit after the first moves expert weights: its GPUs are
first renumbered to keep as many experts in place as possible (align_gpus), then every (GPU, expert) copy that
the new placement has and the old one did not is one expert's weights sent to that GPU (3 x hidden x expert
FFN x 2 bytes for a SwiGLU expert in BF16, the serving precision of the cost model). Moves take time
(result.RefitPrices: the busiest receiver's bytes at the peak scale-up bandwidth); `advise` compares each
interval's predicted step (roofline expert time) plus its moves spread over the scored steps with the fixed
placement's step, recommends refitting only when one is shorter by a stated margin, and otherwise says to keep
the fixed placement.

Modules: steps (per-step loads from a trace), scoring (pure scoring and move counting), schedule (the replay
of schedules), result (results, move cost, advice), config (config, defaults, the run on a trace), render (the
table), commands (`moe-sim rebalance`).

Memory: the window (N steps) of per-step loads [L, E] int32, the open interval's steps while they fit in 64
MiB (the oracle needs an interval's whole load before scoring its steps), an [L, E] sum per longer interval,
whose steps are then streamed a second time, and O(steps) floats of scores; never per-token data. Shape
legend: L MoE layers, E experts, G GPUs, S slots per GPU, W interval steps, N window steps.
"""

from simulator.rebalance.config import (
    MAX_REFITS,
    RebalanceConfig,
    default_intervals,
    default_window,
    passes_needed,
    rebalance_trace,
)
from simulator.rebalance.result import (
    DEFAULT_MARGIN,
    SCHEDULES,
    RebalanceAdvice,
    RebalanceResult,
    RefitPrices,
    advise,
)
from simulator.rebalance.schedule import FitFn, RebalanceReplay, replay_rebalance
from simulator.rebalance.scoring import (
    align_gpus,
    copies_moved,
    copies_received,
    gpu_share,
    presence,
    score_steps,
    step_peaks_means,
)
from simulator.rebalance.steps import count_steps, iter_step_loads, phase_stride

__all__ = [
    "DEFAULT_MARGIN", "MAX_REFITS", "SCHEDULES", "FitFn", "RefitPrices", "RebalanceAdvice", "RebalanceConfig",
    "RebalanceReplay", "RebalanceResult", "advise", "align_gpus", "copies_moved", "copies_received",
    "count_steps", "default_intervals", "default_window", "gpu_share", "iter_step_loads", "passes_needed",
    "phase_stride",
    "presence", "rebalance_trace", "replay_rebalance", "score_steps", "step_peaks_means",
]
