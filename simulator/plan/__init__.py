"""Capacity planning: sweep hardware x GPU count x placement x redundancy x batch in one pass over a trace.

Every (GPU count, placement, redundancy, step size) is one kernel variant; hardware only changes prices, so
each finished step is priced on every GPU type at once. The batch axis is per GPU by default
(`tokens_per_gpu`): in expert-parallel serving attention is data-parallel and every GPU brings its own batch,
so a step of G GPUs holds b x G tokens, and more GPUs can raise throughput. Steps are regrouped per phase;
with phase "all" each grid point is two kernel variants (prefill steps, decode steps) of the same pass, merged
into one candidate, so a phase switch in the trace never cuts a step short. Placements are fitted once per
(GPU count, policy, redundancy) on the fit part of the trace, as in replay. Whole-model throughput adds the
non-expert work estimated from the metadata (cost_model.non_expert_work). The recommendation meets the
throughput target and the latency bound with its weights in HBM next to the stated reserve, and is the
cheapest per hour when every GPU type has a price (user-given, never invented here), else the one with the
fewest GPUs; then the lowest predicted step time.

Modules: config (PlanConfig, prices), grid (grid points as kernel variants), candidates (pricing, frontier,
recommendation), render (the table as text); plan() and PlanResult here.
"""


from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from simulator.cost_model import non_expert_work, pricing_for
from simulator.options import PHASES
from simulator.placement import NEEDS_COSELECTION
from simulator.plan.candidates import Candidate, pareto_frontier, price_candidates, recommend
from simulator.plan.config import (
    LATENCY_PERCENTILE,
    MIN_FULL_STEPS,
    PlanConfig,
    apply_prices,
    parse_gpu_hour_cost,
)
from simulator.plan.grid import GridPoint, grid_points, scored_phase_tokens, step_prefill_flags, too_short
from simulator.replay import Progress, VariantSummary, fit_statistics, merge_groups, run_variants, summarise
from traces.errors import InputError
from traces.reader import Trace
from traces.schema import PHASE_DECODE, PHASE_PREFILL

if TYPE_CHECKING:
    from simulator.cluster import Cluster

__all__ = [
    "LATENCY_PERCENTILE", "MIN_FULL_STEPS", "Candidate", "GridPoint", "PlanConfig", "PlanResult",
    "apply_prices", "grid_points", "pareto_frontier", "parse_gpu_hour_cost", "plan", "price_candidates",
    "recommend",
    "scored_phase_tokens", "step_prefill_flags", "too_short",
]


@dataclass
class PlanResult:
    config: dict[str, Any]
    trace: list[str]
    fit_tokens: int
    score_start: int
    non_expert: dict[str, Any]
    candidates: list[Candidate]
    frontier: list[Candidate]
    recommendation: Candidate | None
    reasons: list[str]
    skipped: list[str]  # grid points that could not be built or planned, and why
    variants: list[VariantSummary] = field(repr=False, default_factory=list)
    scored_tokens: dict[str, int] = field(default_factory=dict)  # per phase, in the scored part
    # per GPU type: what priced it (cost_model)
    pricing: dict[str, dict[str, str]] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {
            "config": self.config,
            "trace": self.trace,
            "fit_tokens": self.fit_tokens,
            "score_start": self.score_start,
            "scored_tokens": self.scored_tokens,
            "pricing": self.pricing,
            "non_expert": self.non_expert,
            "candidates": [dataclasses.asdict(c) for c in self.candidates],
            "frontier": [dataclasses.asdict(c) for c in self.frontier],
            "recommendation": dataclasses.asdict(self.recommendation) if self.recommendation else None,
            "reasons": self.reasons,
            "skipped": self.skipped,
        }



def plan(trace: Trace, config: PlanConfig, progress: Progress | None = None,
         cluster: Cluster | None = None) -> PlanResult:
    """Fit every grid placement, replay them all in one pass, price them on every GPU type, and recommend
    one (the fit counts and the pass's shards on the cluster's workers when one is given: the same
    result)."""
    meta = trace.metadata
    if trace.num_tokens == 0:
        raise InputError(f"{trace.paths[0]}: trace has no tokens")
    steps = [config.step_tokens(b, g) for b in config.batches for g in config.gpus]
    stats = fit_statistics(trace, fit_fraction=config.fit_fraction, phase=config.phase,
                           tokens_per_step=min(steps),
                           with_coselection=any(p in NEEDS_COSELECTION for p in config.placements),
                           chunk_tokens=config.chunk_tokens, cluster=cluster)
    if stats.score_start >= trace.num_tokens:
        raise InputError(f"{trace.paths[0]}: nothing left to score after fitting (lower --fit-fraction)")
    scored = scored_phase_tokens(trace, stats.score_start, config.chunk_tokens)
    if config.phase != "all":
        scored[1 - PHASES[config.phase]] = 0
    if scored.sum() == 0:
        raise InputError(f"{trace.paths[0]}: no {config.phase} tokens to score")
    points, variants, skipped = grid_points(trace, config, stats, scored)
    seg = run_variants(trace, variants, config.hardware, phase=config.phase, score_start=stats.score_start,
                       capacity_factor=config.capacity_factor, chunk_tokens=config.chunk_tokens,
                       progress=progress, cluster=cluster, dispatch=config.dispatch)
    prefill = [step_prefill_flags(seg, variants, p.members, config.phase) for p in points]
    merged = merge_groups(seg, [p.members for p in points])  # prefill and decode variants of each point
    summaries = summarise(merged, [p.variant for p in points], config.hardware, meta,
                          hbm_reserve=config.hbm_reserve)
    ntoks = [merged.series(i)[2] for i in range(len(points))]
    ne = non_expert_work(meta, config.context_tokens)
    candidates = price_candidates(summaries, ntoks, prefill, points, config, ne)
    rec, reasons = recommend(candidates, config)
    cfg = dataclasses.asdict(config) | {"hardware": [g.to_dict() for g in config.hardware]}
    return PlanResult(
        config=cfg, trace=[str(p) for p in trace.paths], fit_tokens=stats.fit_tokens,
        score_start=stats.score_start,
        non_expert={"flops_per_token": ne.flops_per_token, "weight_bytes": ne.weight_bytes,
                    "assumptions": list(ne.assumptions)},
        candidates=candidates, frontier=pareto_frontier(candidates, config.priced), recommendation=rec,
        reasons=reasons, skipped=skipped, variants=summaries,
        scored_tokens={"prefill": int(scored[PHASE_PREFILL]), "decode": int(scored[PHASE_DECODE])},
        pricing={g.name: pricing_for(g, meta).to_dict() for g in config.hardware},
    )

