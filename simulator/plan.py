"""Capacity planning: sweep hardware x GPU count x placement x redundancy x tokens per step in one pass over a trace.

Every (GPU count, placement, redundancy, tokens per step) is one kernel variant; hardware only changes prices, so
each finished step is priced on every GPU type at once. Placements are fitted once per (GPU count, policy,
redundancy) on the fit part of the trace, as in replay. Whole-model throughput adds the non-expert work estimated
from the metadata (cost_model.non_expert_work). The recommendation is the layout with the fewest GPUs, then the
lowest predicted step time, that meets the throughput target and the latency bound while its weights fit in HBM
next to the stated reserve.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from simulator.cost_model import (
    DEFAULT_CONTEXT_TOKENS,
    DEFAULT_HBM_RESERVE,
    NonExpertWork,
    non_expert_work,
)
from simulator.hardware import ClusterLayout, GpuSpec
from simulator.placement import NEEDS_COSELECTION, USES_REDUNDANCY
from simulator.replay import (
    DEFAULT_FIT_FRACTION,
    PHASES,
    Progress,
    Variant,
    VariantSummary,
    fit_statistics,
    fit_variants,
    run_variants,
    summarise,
)
from traces.errors import InputError
from traces.reader import DEFAULT_CHUNK_TOKENS, Trace

LATENCY_PERCENTILE = "p95"  # --max-step-ms bounds this percentile of the whole-model step time


@dataclass
class PlanConfig:
    """The grid to sweep and the goal. `moe-sim plan` fills it from its options."""

    target_tokens_per_s: float
    hardware: list[GpuSpec] = field(default_factory=lambda: [GpuSpec.from_name("h100")])
    gpus: list[int] = field(default_factory=lambda: [8, 16, 32, 64])
    gpus_per_node: int = 8
    placements: list[str] = field(default_factory=lambda: ["contiguous", "balanced", "replicated"])
    redundant_experts: list[int] = field(default_factory=lambda: [0, 8, 16])
    tokens_per_step: list[int] = field(default_factory=lambda: [0])  # 0: the recorded forward passes
    max_step_ms: float | None = None
    phase: str = "all"
    fit_fraction: float = DEFAULT_FIT_FRACTION
    capacity_factor: float | None = None
    hbm_reserve: float = DEFAULT_HBM_RESERVE
    context_tokens: int = DEFAULT_CONTEXT_TOKENS
    chunk_tokens: int = DEFAULT_CHUNK_TOKENS

    def __post_init__(self) -> None:
        if not self.target_tokens_per_s > 0:
            raise InputError(f"--target-tokens-per-s must be positive, got {self.target_tokens_per_s}")
        if not self.hardware or not self.gpus or not self.placements or not self.redundant_experts \
                or not self.tokens_per_step:
            raise InputError("plan: every grid axis needs at least one value")
        for g in self.gpus:
            ClusterLayout(g, self.gpus_per_node)
        if any(r < 0 for r in self.redundant_experts):
            raise InputError("--redundant-experts values must not be negative")
        if any(b < 0 for b in self.tokens_per_step):
            raise InputError("--tokens-per-step values must not be negative (0 = recorded steps)")
        if self.max_step_ms is not None and self.max_step_ms <= 0:
            raise InputError(f"--max-step-ms must be positive, got {self.max_step_ms}")
        if self.phase not in PHASES:
            raise InputError(f"--phase must be one of {', '.join(PHASES)}, not {self.phase!r}")
        if not 0.0 <= self.hbm_reserve < 1.0:
            raise InputError(f"--hbm-reserve must be in [0, 1), got {self.hbm_reserve}")
        if not 0.0 <= self.fit_fraction < 1.0:
            raise InputError(f"--fit-fraction must be in [0, 1), got {self.fit_fraction}")
        if self.capacity_factor is not None and self.capacity_factor <= 0:
            raise InputError(f"--capacity-factor must be positive, got {self.capacity_factor}")


@dataclass
class Candidate:
    """One grid point with its prediction (times in milliseconds per step, throughput for the whole model)."""

    hardware: str
    num_gpus: int
    gpus_per_node: int
    placement: str  # label, e.g. "replicated+16"
    policy: str
    redundant_experts: int
    tokens_per_step: int  # 0: recorded steps
    mean_tokens_per_step: float
    step_ms: float  # mean whole-model step time
    step_ms_p95: float
    step_ms_p99: float
    moe_ms: float  # mean MoE part (expert compute / weight reads, dispatch, combine)
    non_expert_ms: float  # mean attention, dense and embedding part
    breakdown_ms: dict[str, float]  # mean per step: compute, weights, dispatch, combine, non_expert
    tokens_per_s: float  # whole cluster, whole model
    tokens_per_s_per_gpu: float
    imbalance: float
    leave_node_share: float
    memory_per_gpu_bytes: float  # expert weights with replicas + non-expert weights
    usable_hbm_bytes: float  # HBM x (1 - reserve)
    fits_memory: bool
    meets_throughput: bool
    meets_latency: bool
    meets_target: bool
    price_per_hour: float | None = None  # GPUs x price_per_gpu_hour when the hardware states a price

    def describe(self) -> str:
        batch = "recorded steps" if self.tokens_per_step == 0 else f"{self.tokens_per_step} tokens/step"
        return f"{self.num_gpus} x {self.hardware}, {self.placement}, {batch}"


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
    skipped: list[str]  # grid points that could not be built, and why
    variants: list[VariantSummary] = field(repr=False, default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {
            "config": self.config,
            "trace": self.trace,
            "fit_tokens": self.fit_tokens,
            "score_start": self.score_start,
            "non_expert": self.non_expert,
            "candidates": [dataclasses.asdict(c) for c in self.candidates],
            "frontier": [dataclasses.asdict(c) for c in self.frontier],
            "recommendation": dataclasses.asdict(self.recommendation) if self.recommendation else None,
            "reasons": self.reasons,
            "skipped": self.skipped,
        }


def grid_variants(trace: Trace, config: PlanConfig, stats: Any) -> tuple[list[Variant], list[str]]:
    """Fit every (GPU count, policy, redundancy) once and pair it with every tokens-per-step value."""
    meta = trace.metadata
    variants: list[Variant] = []
    skipped: list[str] = []
    for g in config.gpus:
        for policy in config.placements:
            redundancies = config.redundant_experts if policy in USES_REDUNDANCY else [0]
            for r in sorted(set(redundancies)):
                try:
                    fitted = fit_variants(stats, meta, policies=(policy,), num_gpus=g,
                                          gpus_per_node=config.gpus_per_node, redundant_experts=r,
                                          tokens_per_step=0)[0]
                except InputError as exc:
                    skipped.append(f"{policy} R={r} on {g} GPUs: {exc}")
                    continue
                for b in config.tokens_per_step:
                    variants.append(dataclasses.replace(fitted, tokens_per_step=b))
    if not variants:
        raise InputError("plan: no grid point can be built; " + (skipped[0] if skipped else "empty grid"))
    return variants, skipped


def _candidates(summaries: list[VariantSummary], config: PlanConfig, ne: NonExpertWork) -> list[Candidate]:
    out = []
    for s in summaries:
        for h, gpu in enumerate(config.hardware):
            moe = np.asarray(s.step_time_series[h])  # [steps] seconds
            tokens_per_step = s.tokens / max(s.steps, 1)
            non_exp = ne.step_seconds(gpu, tokens_per_step / s.num_gpus)
            total = moe + non_exp
            mean_step = float(total.mean()) if total.size else float("nan")
            p50, p95, p99 = np.percentile(total, [50, 95, 99]) if total.size else (np.nan,) * 3
            tps = s.tokens / float(total.sum()) if total.size and total.sum() > 0 else 0.0
            timing = s.timings[h]
            memory = timing.expert_memory_bytes + ne.weight_bytes
            usable = gpu.hbm_bytes * (1 - config.hbm_reserve)
            fits = memory <= usable
            meets_tp = tps >= config.target_tokens_per_s
            bound = {"p50": float(p50), "p95": float(p95), "p99": float(p99)}[LATENCY_PERCENTILE]
            meets_lat = config.max_step_ms is None or bound * 1e3 <= config.max_step_ms
            out.append(Candidate(
                hardware=gpu.name, num_gpus=s.num_gpus, gpus_per_node=s.gpus_per_node, placement=s.label,
                policy=s.policy, redundant_experts=s.redundant_experts, tokens_per_step=s.tokens_per_step,
                mean_tokens_per_step=tokens_per_step, step_ms=mean_step * 1e3, step_ms_p95=float(p95) * 1e3,
                step_ms_p99=float(p99) * 1e3, moe_ms=float(moe.mean()) * 1e3 if moe.size else float("nan"),
                non_expert_ms=non_exp * 1e3,
                breakdown_ms={k: v * 1e3 for k, v in timing.breakdown.items()} | {"non_expert": non_exp * 1e3},
                tokens_per_s=tps, tokens_per_s_per_gpu=tps / s.num_gpus, imbalance=s.imbalance,
                leave_node_share=s.leave_node_share, memory_per_gpu_bytes=memory, usable_hbm_bytes=usable,
                fits_memory=fits, meets_throughput=meets_tp, meets_latency=meets_lat,
                meets_target=fits and meets_tp and meets_lat,
                price_per_hour=gpu.price_per_gpu_hour * s.num_gpus if gpu.price_per_gpu_hour else None,
            ))
    return out


def pareto_frontier(candidates: list[Candidate]) -> list[Candidate]:
    """Memory-fitting candidates not beaten by another with no more GPUs and at least the throughput."""
    fit = [c for c in candidates if c.fits_memory and c.meets_latency]
    fit.sort(key=lambda c: (c.num_gpus, -c.tokens_per_s, c.step_ms))
    out: list[Candidate] = []
    best = -1.0
    for c in fit:
        if c.tokens_per_s > best:
            out.append(c)
            best = c.tokens_per_s
    return out


def recommend(candidates: list[Candidate], config: PlanConfig) -> tuple[Candidate | None, list[str]]:
    """Fewest GPUs, then lowest mean step time, among candidates meeting every goal; with the reasons."""
    ok = sorted((c for c in candidates if c.meets_target), key=lambda c: (c.num_gpus, c.step_ms))
    target = f"{config.target_tokens_per_s:,.0f} tokens/s"
    lat = f"p95 step <= {config.max_step_ms:g} ms" if config.max_step_ms is not None else "no latency bound"
    reserve = f"{config.hbm_reserve:.0%} of HBM reserved for KV cache and activations"
    reasons = []
    if not ok:
        best = max(candidates, key=lambda c: c.tokens_per_s)
        reasons.append(f"no layout meets {target} with {lat} and {reserve}")
        reasons.append(f"highest throughput: {best.describe()} at {best.tokens_per_s:,.0f} tokens/s "
                       f"(step {best.step_ms:.3g} ms, memory {'fits' if best.fits_memory else 'does not fit'})")
        return None, reasons
    rec = ok[0]
    reasons.append(f"{rec.describe()}: {rec.tokens_per_s:,.0f} tokens/s >= target {target} "
                   f"({rec.tokens_per_s_per_gpu:,.0f} per GPU)")
    reasons.append(f"step time mean {rec.step_ms:.3g} ms, p95 {rec.step_ms_p95:.3g} ms ({lat}); "
                   f"MoE {rec.moe_ms:.3g} ms + non-expert {rec.non_expert_ms:.3g} ms")
    reasons.append(f"weights {rec.memory_per_gpu_bytes / 1e9:.1f} GB per GPU of {rec.usable_hbm_bytes / 1e9:.1f} GB "
                   f"usable ({reserve})")
    reasons.append(f"load imbalance {rec.imbalance:.3f} (max/mean GPU assignments), "
                   f"{rec.leave_node_share:.1%} of assignments leave the node")
    fewer = [c for c in candidates if c.num_gpus < rec.num_gpus]
    if fewer:
        best_fewer = max(fewer, key=lambda c: c.tokens_per_s if c.fits_memory else -1.0)
        why = []
        if not best_fewer.fits_memory:
            why.append("weights do not fit in HBM")
        if not best_fewer.meets_throughput:
            why.append(f"{best_fewer.tokens_per_s:,.0f} tokens/s is below target")
        if not best_fewer.meets_latency:
            why.append(f"p95 step {best_fewer.step_ms_p95:.3g} ms is over the bound")
        reasons.append(f"fewer GPUs fall short: best is {best_fewer.describe()}: {'; '.join(why) or 'fails'}")
    same = [c for c in candidates if c.num_gpus == rec.num_gpus and c.hardware == rec.hardware
            and c.tokens_per_step == rec.tokens_per_step and c.placement != rec.placement]
    failing = [c for c in same if not c.meets_target]
    if failing:
        worst = ", ".join(f"{c.placement} ({c.tokens_per_s:,.0f} tokens/s, imbalance {c.imbalance:.2f})"
                          for c in sorted(failing, key=lambda c: c.tokens_per_s)[:3])
        reasons.append(f"on the same GPUs these placements miss the goal: {worst}")
    return rec, reasons


def plan(trace: Trace, config: PlanConfig, progress: Progress | None = None) -> PlanResult:
    """Fit every grid placement, replay them all in one pass, price them on every GPU type, and recommend one."""
    meta = trace.metadata
    if trace.num_tokens == 0:
        raise InputError(f"{trace.paths[0]}: trace has no tokens")
    stats = fit_statistics(trace, fit_fraction=config.fit_fraction, phase=config.phase,
                           tokens_per_step=min(config.tokens_per_step),
                           with_coselection=any(p in NEEDS_COSELECTION for p in config.placements),
                           chunk_tokens=config.chunk_tokens)
    if stats.score_start >= trace.num_tokens:
        raise InputError(f"{trace.paths[0]}: nothing left to score after fitting (lower --fit-fraction)")
    variants, skipped = grid_variants(trace, config, stats)
    seg = run_variants(trace, variants, config.hardware, phase=config.phase, score_start=stats.score_start,
                       capacity_factor=config.capacity_factor, chunk_tokens=config.chunk_tokens, progress=progress)
    summaries = summarise(seg, variants, config.hardware, meta, hbm_reserve=config.hbm_reserve)
    if summaries[0].tokens == 0:
        raise InputError(f"{trace.paths[0]}: no {config.phase} tokens to score")
    ne = non_expert_work(meta, config.context_tokens)
    candidates = _candidates(summaries, config, ne)
    rec, reasons = recommend(candidates, config)
    cfg = dataclasses.asdict(config) | {"hardware": [g.to_dict() for g in config.hardware]}
    return PlanResult(
        config=cfg, trace=[str(p) for p in trace.paths], fit_tokens=stats.fit_tokens, score_start=stats.score_start,
        non_expert={"flops_per_token": ne.flops_per_token, "weight_bytes": ne.weight_bytes,
                    "assumptions": list(ne.assumptions)},
        candidates=candidates, frontier=pareto_frontier(candidates), recommendation=rec, reasons=reasons,
        skipped=skipped, variants=summaries,
    )
