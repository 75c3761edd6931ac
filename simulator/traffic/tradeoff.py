"""The trade-off curve of all-to-all bytes against step imbalance: the traffic-aware policies fitted at
several step budgets, every placement scored under both dispatch models, each point against `balanced`
returning home.

Shape legend: L MoE layers, E experts.
"""

from __future__ import annotations

from dataclasses import dataclass

from simulator.placement import TRAFFIC_AWARE, PlacementNotApplicable, fit_placement
from simulator.replay.fitting import fit_statistics
from simulator.traffic.kernels import DISPATCH_MODELS
from simulator.traffic.score import TrafficScore, score_traffic
from traces.errors import InputError
from traces.reader import DEFAULT_CHUNK_TOKENS, Trace

# Step budgets the curve is drawn at (share the sampled step load may grow over the start's).
CURVE_BUDGETS = (0.0, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5)
REFERENCE = ("balanced", "home")  # what every point is compared with


@dataclass(frozen=True)
class CurvePoint:
    """One fitted placement under one dispatch model; `budget` is None for policies without one."""

    policy: str
    budget: float | None
    score: TrafficScore
    bytes_change: float  # all-to-all bytes per token over the reference's, minus 1
    imbalance_change: float  # step imbalance over the reference's, minus 1

    @property
    def label(self) -> str:
        return self.policy if self.budget is None else f"{self.policy} (budget {self.budget:.0%})"

    def to_dict(self) -> dict[str, object]:
        return {"policy": self.policy, "budget": self.budget, **self.score.to_dict(),
                "bytes_change": self.bytes_change, "imbalance_change": self.imbalance_change}


@dataclass(frozen=True)
class TradeoffCurve:
    points: list[CurvePoint]
    skipped: list[str]  # "policy: reason"
    num_gpus: int
    redundant_experts: int
    tokens_per_step: int

    def best_within(self, imbalance_change: float) -> CurvePoint | None:
        """The point with the fewest bytes whose step imbalance is at most this much over the reference's."""
        fits = [p for p in self.points if p.imbalance_change <= imbalance_change + 1e-12]
        return min(fits, key=lambda p: p.score.all_to_all_bytes_per_token, default=None)


def tradeoff_curve(trace: Trace, *, num_gpus: int, gpus_per_node: int, redundant_experts: int,
                   policies: tuple[str, ...] = ("balanced", "replicated", "coactivation", "affinity"),
                   budgets: tuple[float, ...] = CURVE_BUDGETS, fit_fraction: float = 0.25,
                   tokens_per_step: int = 0, phase: str = "all",
                   chunk_tokens: int = DEFAULT_CHUNK_TOKENS) -> TradeoffCurve:
    """Fit on the first fit_fraction of the trace, score on the rest (as the replay does)."""
    if "balanced" not in policies:
        policies = ("balanced", *policies)
    stats = fit_statistics(trace, fit_fraction=fit_fraction, phase=phase, tokens_per_step=tokens_per_step,
                           with_coselection=True, chunk_tokens=chunk_tokens)
    if stats.score_start >= trace.num_tokens:
        raise InputError(f"{trace.paths[0]}: nothing left to score after fitting on {stats.fit_tokens} "
                         "tokens (lower the fit fraction)")
    fitted, keys, skipped = [], [], []
    for policy in policies:
        for budget in (budgets if policy in TRAFFIC_AWARE else (None,)):
            try:
                placement = fit_placement(policy, stats.load, num_gpus=num_gpus, gpus_per_node=gpus_per_node,
                                          redundant_experts=redundant_experts, coselection=stats.coselection,
                                          routing=stats.routing, step_budget=budget)
            except PlacementNotApplicable as exc:
                skipped.append(f"{policy}: {exc.reason}")
                break
            fitted.append(placement)
            keys.append((policy, budget))
    scores = {model: score_traffic(trace, fitted, [p for p, _ in keys], dispatch_model=model, phase=phase,
                                   score_start=stats.score_start, tokens_per_step=tokens_per_step,
                                   chunk_tokens=chunk_tokens) for model in DISPATCH_MODELS}
    ref = scores[REFERENCE[1]][keys.index((REFERENCE[0], None))]
    points = [CurvePoint(policy, budget, s,
                         s.all_to_all_bytes_per_token / ref.all_to_all_bytes_per_token - 1,
                         s.step_imbalance / ref.step_imbalance - 1)
              for model in DISPATCH_MODELS for (policy, budget), s in zip(keys, scores[model], strict=True)]
    return TradeoffCurve(points, skipped, num_gpus, redundant_experts, tokens_per_step)
