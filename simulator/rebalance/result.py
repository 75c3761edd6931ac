"""What a rebalance replay found: per-schedule scores, the price of moving weights, and the advice.

Imbalance figures are simulator.metrics': the headline step imbalance (token-weighted), the aggregate
imbalance, and percentiles of each step's own ratio.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from simulator import metrics, units
from simulator.cost_model import HBM_EFFICIENCY, MATMUL_EFFICIENCY, expert_weight_bytes
from simulator.hardware import GpuSpec
from traces.schema import TraceMetadata

SCHEDULES = ("fixed", "rebalanced", "oracle")
# Refitting is recommended only when its step imbalance, moves included, is at least this much below the fixed
# placement's: a smaller gain is within what a different window or trace would change (stated assumption).
DEFAULT_MARGIN = 0.02
UNIT_PRICES = "unit prices"  # RefitPrices.unit's name: times are busiest-GPU loads


@dataclass(frozen=True)
class RefitPrices:
    """What a step's expert work and a refit's weight moves cost on one GPU type (the roofline, uncalibrated).

    A step's expert time is, per layer, the slowest GPU's max(assignments x seconds_per_assignment, experts
    with work x seconds_per_expert_read), summed over layers: the cost model's roofline with the effective
    FLOP/s and HBM bandwidth (dispatch and combine are left out: a refit does not change them much). A refit's
    moves take the busiest receiver's bytes over the peak scale-up bandwidth (the receivers fetch in parallel;
    peak, so the move time is never overstated and a "don't refit" verdict holds a fortiori).
    """

    hardware: str
    scale_up_bandwidth: float  # bytes/s into one GPU
    seconds_per_assignment: float
    seconds_per_expert_read: float

    @classmethod
    def for_gpu(cls, gpu: GpuSpec, meta: TraceMetadata) -> RefitPrices:
        return cls(gpu.name, gpu.scale_up_bandwidth,
                   meta.flops_per_assignment / (gpu.bf16_flops * MATMUL_EFFICIENCY),
                   expert_weight_bytes(meta) / (gpu.hbm_bandwidth * HBM_EFFICIENCY))

    @classmethod
    def unit(cls) -> RefitPrices:
        """No hardware: a step costs its busiest-GPU load (one second per assignment) and moves are free."""
        return cls(UNIT_PRICES, float("inf"), 1.0, 0.0)

    def to_dict(self) -> dict[str, Any]:
        return {"hardware": self.hardware, "scale_up_bandwidth": self.scale_up_bandwidth,
                "seconds_per_assignment": self.seconds_per_assignment,
                "seconds_per_expert_read": self.seconds_per_expert_read}


@dataclass
class RebalanceResult:
    """Scores of one (W, N) schedule; name is one of SCHEDULES.

    per_step: name -> [scored steps] each step's own imbalance; peak_load / mean_load: name -> the scored
    steps' sums of the layer-summed busiest and mean GPU load (their ratio is the step imbalance); gpu_load:
    name -> [L, G] load per GPU over the scored steps (the oracle's GPUs numbered as each of its fits has
    them); expert_seconds: name -> predicted expert time summed over the scored steps (RefitPrices);
    sglang_per_step: name -> [scored steps] SGLang's balancedness of each step (simulator.metrics).
    """

    every: int
    window: int
    steps: int  # steps in the trace (after the phase filter)
    scored_steps: int  # steps after the warm-up window
    rebalances: int  # refits after the first fit (each may move weights)
    per_step: dict[str, np.ndarray]
    peak_load: dict[str, float]
    mean_load: dict[str, float]
    gpu_load: dict[str, np.ndarray]
    expert_seconds: dict[str, float]
    moved_copies: np.ndarray  # [rebalances] expert copies sent to GPUs at each refit
    # [rebalances] copies received by the GPU that receives the most, at each refit
    busiest_copies: np.ndarray
    expert_bytes: int  # bytes of one expert's weights
    prices: RefitPrices = field(default_factory=RefitPrices.unit)
    sglang_per_step: dict[str, np.ndarray] = field(default_factory=dict)
    settings: dict[str, Any] = field(default_factory=dict)  # policy, GPUs, redundancy, phase, ...

    @property
    def moved_bytes(self) -> np.ndarray:
        """[rebalances] expert-weight bytes moved at each refit."""
        return self.moved_copies.astype(np.int64) * self.expert_bytes

    @property
    def move_seconds(self) -> np.ndarray:
        """[rebalances] seconds each refit's moves take (the busiest receiver's bytes over its bandwidth)."""
        return self.busiest_copies * self.expert_bytes / self.prices.scale_up_bandwidth

    def step_imbalance(self, name: str) -> float:
        return metrics.ratio(self.peak_load[name], self.mean_load[name])

    def aggregate_imbalance(self, name: str) -> float:
        return metrics.aggregate_imbalance(self.gpu_load[name])

    def sglang_balancedness(self, name: str) -> float:
        return metrics.mean_over_steps(self.sglang_per_step.get(name, np.zeros(0)))

    def vllm_balancedness(self, name: str) -> float:
        return metrics.mean_over_steps(metrics.vllm_step_balancedness(self.per_step[name]))

    def seconds_per_step(self, name: str) -> float:
        """Mean predicted expert time per scored step of a schedule (moves not included)."""
        return self.expert_seconds[name] / max(self.scored_steps, 1)

    def move_seconds_per_step(self) -> float:
        """The refits' move time spread over the scored steps."""
        return float(self.move_seconds.sum()) / max(self.scored_steps, 1)

    def seconds_with_moves(self) -> float:
        """Mean time per scored step of the rebalanced schedule: its expert time plus its moves spread out."""
        return self.seconds_per_step("rebalanced") + self.move_seconds_per_step()

    def gain(self) -> float:
        """How much shorter than the fixed placement's a rebalanced step is, moves included (negative:
        longer)."""
        fixed = self.seconds_per_step("fixed")
        return 1 - self.seconds_with_moves() / fixed if fixed > 0 else 0.0

    def percentile(self, name: str, q: float) -> float:
        values = self.per_step[name]
        return float(np.percentile(values, q)) if values.size else float("nan")

    def to_dict(self, series: bool = False) -> dict[str, Any]:
        """JSON-ready summary; series=True adds the per-step imbalance of each schedule."""
        moved = self.moved_bytes
        out: dict[str, Any] = {
            "every": self.every,
            "window": self.window,
            "steps": self.steps,
            "scored_steps": self.scored_steps,
            "rebalances": self.rebalances,
            "expert_bytes": self.expert_bytes,
            "moved_copies_per_rebalance": float(self.moved_copies.mean()) if self.rebalances else 0.0,
            "moved_bytes_per_rebalance": float(moved.mean()) if self.rebalances else 0.0,
            "moved_bytes_max": int(moved.max()) if self.rebalances else 0,
            "moved_bytes_total": int(moved.sum()),
            "move_seconds_total": float(self.move_seconds.sum()),
            "seconds_per_step_with_moves": self.seconds_with_moves(),
            "gain_over_fixed": self.gain(),
            "prices": self.prices.to_dict(),
            "settings": self.settings,
        }
        for name in SCHEDULES:
            out[name] = {
                "step_imbalance": self.step_imbalance(name),
                "aggregate_imbalance": self.aggregate_imbalance(name),
                "sglang_balancedness": self.sglang_balancedness(name),
                "vllm_balancedness": self.vllm_balancedness(name),
                "seconds_per_step": self.seconds_per_step(name),
                "p50": self.percentile(name, 50),
                "p95": self.percentile(name, 95),
                "p99": self.percentile(name, 99),
            }
            if series:
                out[name]["per_step"] = self.per_step[name].tolist()
        return out


@dataclass(frozen=True)
class RebalanceAdvice:
    """Refit every `every` steps, or keep the fixed placement (every None); with the reason in one
    sentence."""

    every: int | None
    reason: str
    margin: float

    def to_dict(self) -> dict[str, Any]:
        return {"every": self.every, "reason": self.reason, "margin": self.margin}


def advise(results: list[RebalanceResult], margin: float = DEFAULT_MARGIN) -> RebalanceAdvice:
    """The interval with the shortest predicted step, moves included, if it is at least `margin` (a fraction)
    shorter than the fixed placement's; else keep the fixed placement. Every result scores the same fixed
    placement on the same steps."""
    first = results[0]
    fixed, fixed_time = first.step_imbalance("fixed"), first.seconds_per_step("fixed")
    best = min(results, key=lambda r: (r.seconds_with_moves(), -r.every))
    gain = best.gain()
    unit = best.prices.hardware == UNIT_PRICES

    def time(x: float) -> str:
        return f"{units.sig(x)} load" if unit else units.seconds(x)

    what = (f"step imbalance {best.step_imbalance('rebalanced'):.3f} against {fixed:.3f} fixed; expert time "
            f"{time(best.seconds_per_step('rebalanced'))} + moves {time(best.move_seconds_per_step())} per "
            f"step against {time(fixed_time)} fixed" + ("" if unit else f" on {best.prices.hardware}")
            + f", moving {units.nbytes(float(best.moved_bytes.sum()) / max(best.rebalances, 1))} per refit")
    if best.rebalances and gain >= margin:
        return RebalanceAdvice(best.every,
                               f"refit every {best.every} steps: {gain:.1%} shorter steps than the "
                               f"fixed placement, over the {margin:.0%} margin ({what})", margin)
    if not best.rebalances:
        why = "no interval refits within the scored steps"
    elif gain > 0:
        why = (f"the best interval, every {best.every} steps, is only {gain:.1%} shorter, under the "
               f"{margin:.0%} margin ({what})")
    else:
        why = f"no interval is shorter once its moves are counted; the best, every {best.every} steps: {what}"
    return RebalanceAdvice(None, f"keep the fixed placement: {why}", margin)
