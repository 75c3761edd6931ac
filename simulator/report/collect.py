"""Run everything a report shows over a trace: plan (when a target is given), replay, rebalance, routing
analysis.

The replayed layout and its step size are the plan's recommendation when there is one (so the report shows how
its placements compare at the batch it recommends), else the frontier point with the highest throughput, else
the first GPU count and hardware given with the recorded forward passes (or --tokens-per-step). Each pass
streams the trace; none holds per-token data.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timezone

import numpy as np

from simulator.cli_options import ProgressFactory
from simulator.cost_model import DEFAULT_CONTEXT_TOKENS
from simulator.hardware import GpuSpec
from simulator.options import ScoringOptions
from simulator.placement import PlacementNotApplicable, fit_placement
from simulator.plan import Candidate, PlanConfig, PlanResult, plan
from simulator.rebalance import (
    DEFAULT_MARGIN,
    RebalanceConfig,
    advise,
    count_steps,
    passes_needed,
    rebalance_trace,
)
from simulator.replay import DEFAULT_PLACEMENTS, ReplayConfig, replay
from simulator.report.build import ReportInputs, StepBasis
from simulator.routing_analysis import DEFAULT_SEGMENTS, analyze_routing
from simulator.traffic.tradeoff import tradeoff_curve
from traces.errors import InputError
from traces.reader import Trace

# step budgets of the traffic section's curves (fewer than the benchmark's: each is a fit of two policies)
REPORT_BUDGETS = (0.0, 0.02, 0.05, 0.2)


@dataclass(kw_only=True)
class ReportOptions(ScoringOptions):
    """The report command's options, as the library sees them (the cluster and scoring ones shared with replay
    and plan)."""

    hardware: list[GpuSpec]
    gpus: list[int]  # GPU counts swept by the plan; the first is replayed when there is no plan
    placements: tuple[str, ...] = DEFAULT_PLACEMENTS  # compared in the replay section
    plan_placements: tuple[str, ...] = ("contiguous", "balanced", "replicated")
    redundant_experts: list[int] = field(default_factory=lambda: [0, 8, 16])
    # 0: the recorded forward passes (replay, rebalance); > 0 also fixes the plan's steps
    tokens_per_step: int = 0
    # the plan's per-GPU batches (None: its default for the phase)
    plan_tokens_per_gpu: list[int] | None = None
    context_tokens: int = DEFAULT_CONTEXT_TOKENS
    target_tokens_per_s: float | None = None  # None: no plan sweep
    max_step_ms: float | None = None
    rebalance_every: tuple[int, ...] = ()  # empty: a spread of intervals chosen from the trace's length
    window: int | None = None  # None: default_window(steps)
    # refitting must beat the fixed placement by this, moves included
    rebalance_margin: float = DEFAULT_MARGIN
    rebalance_policy: str | None = None  # None: replicated when the layout has redundant slots, else balanced
    segments: int = DEFAULT_SEGMENTS

    def __post_init__(self) -> None:
        super().__post_init__()
        if not self.hardware:
            raise InputError("--hardware: give at least one GPU preset or file")
        if not self.gpus or any(g < 1 for g in self.gpus):
            raise InputError("--gpus: give one or more positive GPU counts")
        for g in self.gpus:
            self.check_layout(g)  # fails before the long passes, as plan would after them


def _buildable(policies: tuple[str, ...], num_experts: int, num_gpus: int, gpus_per_node: int,
               redundant: int) -> tuple[tuple[str, ...], list[str]]:
    """Policies that can be fitted on this layout (e.g. contiguous needs E divisible by G), and why others
    cannot."""
    ok, skipped = [], []
    # one layer is enough to learn whether the layout can be built (files are checked against the trace by
    # replay)
    probe = np.ones((1, num_experts))
    cosel = np.ones((1, num_experts, num_experts))
    for policy in policies:
        if policy.startswith("file:"):
            ok.append(policy)  # a user's file is checked against the trace, with a clear error, by the replay
            continue
        try:
            fit_placement(policy, probe, num_gpus=num_gpus, gpus_per_node=gpus_per_node,
                          redundant_experts=redundant, coselection=cosel)
            ok.append(policy)
        except PlacementNotApplicable as exc:
            skipped.append(f"{policy}: {exc.reason}")
        except InputError as exc:
            skipped.append(f"{policy}: {exc}")
    if not ok:
        raise InputError(f"no placement can be built on {num_gpus} GPUs: {skipped[0]}")
    return tuple(ok), skipped


def _redundancy(num_experts: int, num_gpus: int, candidates: list[int]) -> int:
    """Largest candidate redundancy that spreads evenly over the GPUs (0 if none does)."""
    fitting = [r for r in candidates if r >= 0 and (num_experts + r) % num_gpus == 0]
    return max(fitting, default=0)


def replayed_point(plan_result: PlanResult | None) -> tuple[Candidate | None, str]:
    """The plan point whose layout and batch the replay and rebalance sections use, and why ("recommendation",
    "frontier": none meets the goal, the frontier point with the highest throughput; "fallback": nothing
    fits)."""
    if plan_result is None:
        return None, ""
    if plan_result.recommendation is not None:
        return plan_result.recommendation, "recommendation"
    if plan_result.frontier:
        return max(plan_result.frontier,
                   key=lambda c: (c.tokens_per_s, -c.num_gpus, -c.step_ms_p95)), "frontier"
    return None, "fallback"


def collect_inputs(trace: Trace, options: ReportOptions, progress: ProgressFactory | None = None,
                   settings: dict | None = None) -> ReportInputs:
    """Run the analyses the report needs over `trace` and gather their results."""
    meta = trace.metadata
    tokens = trace.num_tokens
    if tokens == 0:
        raise InputError(f"{trace.paths[0]}: the trace has no tokens to report on")

    def bar(label: str, passes: int = 1) -> Callable[[int], None] | None:
        return progress(label, passes * tokens) if progress is not None else None

    plan_result: PlanResult | None = None
    if options.target_tokens_per_s is not None:
        plan_config = PlanConfig(
            target_tokens_per_s=options.target_tokens_per_s, hardware=options.hardware, gpus=options.gpus,
            gpus_per_node=options.gpus_per_node, placements=list(options.plan_placements),
            redundant_experts=options.redundant_experts,
            tokens_per_step=[options.tokens_per_step] if options.tokens_per_step else None,
            tokens_per_gpu=options.plan_tokens_per_gpu,
            max_step_ms=options.max_step_ms, phase=options.phase, fit_fraction=options.fit_fraction,
            capacity_factor=options.capacity_factor, hbm_reserve=options.hbm_reserve,
            context_tokens=options.context_tokens, chunk_tokens=options.chunk_tokens,
            dispatch=options.dispatch,
        )
        plan_result = plan(trace, plan_config, progress=bar("plan"))

    point, source = replayed_point(plan_result)
    if point is not None:
        gpu = next(h for h in options.hardware if h.name == point.hardware)
        num_gpus, redundant = point.num_gpus, point.redundant_experts
        # the plan's step for this point (per-GPU batch x GPUs), regrouped per phase by replay and rebalance
        # alike
        tokens_per_step = point.tokens_per_step
        basis = StepBasis(source, tokens_per_step, point.tokens_per_gpu, num_gpus, point.describe())
    else:
        gpu, num_gpus = options.hardware[0], options.gpus[0]
        redundant = 0
        tokens_per_step = options.tokens_per_step
        basis = StepBasis(source or ("option" if tokens_per_step else "recorded"), tokens_per_step, 0,
                          num_gpus)
    if redundant == 0:
        redundant = _redundancy(meta.num_experts, num_gpus, options.redundant_experts + [num_gpus])
    placements, skipped = _buildable(options.placements, meta.num_experts, num_gpus, options.gpus_per_node,
                                     redundant)
    replay_config = ReplayConfig(
        num_gpus=num_gpus, gpus_per_node=options.gpus_per_node, hardware=gpu, placements=placements,
        redundant_experts=redundant, tokens_per_step=tokens_per_step, phase=options.phase,
        fit_fraction=options.fit_fraction, capacity_factor=options.capacity_factor,
        hbm_reserve=options.hbm_reserve, chunk_tokens=options.chunk_tokens, dispatch=options.dispatch,
    )
    replay_result = replay(trace, replay_config, progress=bar("replay"))

    policy = options.rebalance_policy or ("replicated" if redundant else "balanced")
    rebalance_config = RebalanceConfig(
        every=options.rebalance_every, window=options.window, policy=policy, num_gpus=num_gpus,
        gpus_per_node=options.gpus_per_node, redundant_experts=redundant,
        phase=None if options.phase == "all" else options.phase, tokens_per_step=tokens_per_step or None,
        hardware=gpu, margin=options.rebalance_margin,
    ).resolve(trace, options.chunk_tokens)
    assert rebalance_config.window is not None
    steps = count_steps(trace, phase=rebalance_config.phase, tokens_per_step=rebalance_config.tokens_per_step,
                        chunk_tokens=options.chunk_tokens)
    if steps <= rebalance_config.window:
        raise InputError(f"--window {rebalance_config.window}: the trace has only {steps} steps "
                         f"({basis.size()}), none left to score after the window (lower --window)")
    rebalance_results = rebalance_trace(trace, rebalance_config, chunk_tokens=options.chunk_tokens,
                                        progress=bar("rebalance", passes_needed(rebalance_config.every,
                                                                                   meta.num_moe_layers,
                                                                                   meta.num_experts)))
    rebalance_advice = advise(rebalance_results, rebalance_config.margin)

    routing = analyze_routing(trace, segments=options.segments, chunk_tokens=options.chunk_tokens,
                              progress=bar("routing"))
    traffic = tradeoff_curve(trace, num_gpus=num_gpus, gpus_per_node=options.gpus_per_node,
                             redundant_experts=redundant, budgets=REPORT_BUDGETS,
                             policies=("balanced", "replicated", "coactivation", "affinity") if redundant
                             else ("balanced", "coactivation", "affinity"),
                             fit_fraction=options.fit_fraction, tokens_per_step=tokens_per_step,
                             phase=options.phase, chunk_tokens=options.chunk_tokens)
    shown = dict(settings or {})
    if skipped:
        shown["placements not buildable on this layout"] = skipped
    return ReportInputs(
        trace_paths=[str(p) for p in trace.paths], metadata=meta, num_tokens=tokens, routing=routing,
        replay=replay_result, rebalance=rebalance_results, rebalance_advice=rebalance_advice,
        hardware=list(options.hardware), plan=plan_result, settings=shown,
        created_at=datetime.now(timezone.utc).isoformat(timespec="seconds"), step_basis=basis,
        traffic=traffic,
    )

