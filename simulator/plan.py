"""Capacity planning: sweep hardware x GPU count x placement x redundancy x batch in one pass over a trace.

Every (GPU count, placement, redundancy, step size) is one kernel variant; hardware only changes prices, so each
finished step is priced on every GPU type at once. The batch axis is per GPU by default (`tokens_per_gpu`): in
expert-parallel serving attention is data-parallel and every GPU brings its own batch, so a step of G GPUs holds
b x G tokens, and more GPUs can raise throughput. Steps are regrouped per phase; with phase "all" each grid point is
two kernel variants (prefill steps, decode steps) of the same pass, merged into one candidate, so a phase switch in
the trace never cuts a step short. Placements are fitted once per (GPU count, policy, redundancy) on the fit part of
the trace, as in replay. Whole-model throughput adds the non-expert work estimated from the metadata
(cost_model.non_expert_work). The recommendation meets the throughput target and the latency bound with its weights
in HBM next to the stated reserve, and is the cheapest per hour when every GPU type has a price (user-given, never
invented here), else the one with the fewest GPUs; then the lowest predicted step time.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from simulator.cost_model import (
    DEFAULT_CONTEXT_TOKENS,
    DEFAULT_HBM_RESERVE,
    DEFAULT_TOKENS_PER_GPU,
    NonExpertWork,
    non_expert_work,
    pricing_for,
)
from simulator.hardware import ClusterLayout, GpuSpec
from simulator.placement import NEEDS_COSELECTION, USES_REDUNDANCY
from simulator.replay import (
    DEFAULT_FIT_FRACTION,
    PHASES,
    Progress,
    Segment,
    Variant,
    VariantSummary,
    fit_statistics,
    fit_variants,
    merge_groups,
    run_variants,
    summarise,
)
from traces.errors import InputError
from traces.reader import DEFAULT_CHUNK_TOKENS, Trace
from traces.schema import PHASE_DECODE, PHASE_NAMES, PHASE_PREFILL

LATENCY_PERCENTILE = "p95"  # --max-step-ms bounds this percentile of the whole-model step time
# A regrouped grid point is planned only when the scored part holds at least this many full steps of each phase it
# replays: fewer would make the mean and p95 rest on one or two steps (and a partial last step).
MIN_FULL_STEPS = 4


@dataclass
class PlanConfig:
    """The grid to sweep and the goal. `moe-sim plan` fills it from its options.

    Batch axis: `tokens_per_gpu` (step = b x GPUs tokens) or `tokens_per_step` (absolute; 0 = the recorded forward
    passes), not both; with neither, the per-GPU default for the phase (cost_model.DEFAULT_TOKENS_PER_GPU).
    """

    target_tokens_per_s: float
    hardware: list[GpuSpec] = field(default_factory=lambda: [GpuSpec.from_name("h100")])
    gpus: list[int] = field(default_factory=lambda: [8, 16, 32, 64])
    gpus_per_node: int = 8
    placements: list[str] = field(default_factory=lambda: ["contiguous", "balanced", "replicated"])
    redundant_experts: list[int] = field(default_factory=lambda: [0, 8, 16])
    tokens_per_step: list[int] | None = None  # absolute step sizes; 0: the recorded forward passes
    max_step_ms: float | None = None
    phase: str = "all"
    fit_fraction: float = DEFAULT_FIT_FRACTION
    capacity_factor: float | None = None
    hbm_reserve: float = DEFAULT_HBM_RESERVE
    context_tokens: int = DEFAULT_CONTEXT_TOKENS
    chunk_tokens: int = DEFAULT_CHUNK_TOKENS
    tokens_per_gpu: list[int] | None = None  # per-GPU batch: a step of G GPUs holds b x G tokens
    min_full_steps: int = MIN_FULL_STEPS

    def __post_init__(self) -> None:
        if not self.target_tokens_per_s > 0:
            raise InputError(f"--target-tokens-per-s must be positive, got {self.target_tokens_per_s}")
        if self.phase not in PHASES:
            raise InputError(f"--phase must be one of {', '.join(PHASES)}, not {self.phase!r}")
        if self.tokens_per_step is not None and self.tokens_per_gpu is not None:
            raise InputError("--tokens-per-step and --tokens-per-gpu are mutually exclusive: give absolute step "
                             "sizes or per-GPU batches, not both")
        if self.tokens_per_step is None and self.tokens_per_gpu is None:
            self.tokens_per_gpu = list(DEFAULT_TOKENS_PER_GPU[self.phase])
        if not self.hardware or not self.gpus or not self.placements or not self.redundant_experts \
                or not self.batches:
            raise InputError("plan: every grid axis needs at least one value")
        for g in self.gpus:
            ClusterLayout(g, self.gpus_per_node)
        if any(r < 0 for r in self.redundant_experts):
            raise InputError("--redundant-experts values must not be negative")
        if self.tokens_per_step is not None and any(b < 0 for b in self.tokens_per_step):
            raise InputError("--tokens-per-step values must not be negative (0 = recorded steps)")
        if self.tokens_per_gpu is not None and any(b < 1 for b in self.tokens_per_gpu):
            raise InputError("--tokens-per-gpu values must be positive")
        if self.max_step_ms is not None and self.max_step_ms <= 0:
            raise InputError(f"--max-step-ms must be positive, got {self.max_step_ms}")
        if not 0.0 <= self.hbm_reserve < 1.0:
            raise InputError(f"--hbm-reserve must be in [0, 1), got {self.hbm_reserve}")
        if not 0.0 <= self.fit_fraction < 1.0:
            raise InputError(f"--fit-fraction must be in [0, 1), got {self.fit_fraction}")
        if self.capacity_factor is not None and self.capacity_factor <= 0:
            raise InputError(f"--capacity-factor must be positive, got {self.capacity_factor}")
        names = [g.name for g in self.hardware]
        if len(set(names)) != len(names):
            raise InputError(f"--hardware: GPU names must be distinct, got {', '.join(names)}")

    @property
    def per_gpu(self) -> bool:
        return self.tokens_per_gpu is not None

    @property
    def batches(self) -> list[int]:
        """The batch axis as given: per-GPU batches, or absolute tokens per step."""
        values = self.tokens_per_gpu if self.tokens_per_gpu is not None else self.tokens_per_step
        return sorted(set(values or []))

    def step_tokens(self, batch: int, num_gpus: int) -> int:
        """Tokens per step of a grid point (0: recorded steps)."""
        return batch * num_gpus if self.per_gpu else batch

    @property
    def priced(self) -> bool:
        """Every GPU type swept has a price, so layouts can be ranked by cost."""
        return all(g.price_per_gpu_hour is not None for g in self.hardware)


def parse_gpu_hour_cost(text: str) -> dict[str, float]:
    """`--gpu-hour-cost h100=2.5,b200=6` -> {"h100": 2.5, "b200": 6.0} (prices per GPU-hour, the user's currency)."""
    prices: dict[str, float] = {}
    for item in (t.strip() for t in text.split(",")):
        if not item:
            continue
        name, sep, value = item.partition("=")
        try:
            price = float(value)
        except ValueError:
            price = float("nan")
        if not sep or not name.strip() or not price > 0:
            raise InputError(f"--gpu-hour-cost: expected NAME=PRICE with a positive price, got {item!r}")
        prices[name.strip().lower()] = price
    if not prices:
        raise InputError("--gpu-hour-cost: give at least one NAME=PRICE")
    return prices


def apply_prices(hardware: list[GpuSpec], prices: dict[str, float]) -> list[GpuSpec]:
    """Set price_per_gpu_hour on the swept GPUs named in prices (a price given here overrides a hardware file's)."""
    names = {g.name.lower() for g in hardware}
    unknown = sorted(set(prices) - names)
    if unknown:
        raise InputError(f"--gpu-hour-cost: {', '.join(unknown)} not in --hardware ({', '.join(sorted(names))})")
    return [dataclasses.replace(g, price_per_gpu_hour=prices[g.name.lower()]) if g.name.lower() in prices else g
            for g in hardware]


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
    price_per_hour: float | None = None  # GPUs x price_per_gpu_hour when the hardware has a price
    tokens_per_gpu: int = 0  # per-GPU batch of the grid point (0: the batch axis was absolute tokens per step)
    steps: int = 0  # scored steps the prediction rests on
    cost_per_million_tokens: float | None = None  # price_per_hour / (tokens/s x 3600) x 1e6

    def batch(self) -> str:
        if self.tokens_per_gpu:
            return f"{self.tokens_per_gpu} tokens/GPU ({self.tokens_per_step} per step)"
        return "recorded steps" if self.tokens_per_step == 0 else f"{self.tokens_per_step} tokens/step"

    def describe(self) -> str:
        return f"{self.num_gpus} x {self.hardware}, {self.placement}, {self.batch()}"


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
    pricing: dict[str, dict[str, str]] = field(default_factory=dict)  # per GPU type: what priced it (cost_model)

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


@dataclass(frozen=True)
class GridPoint:
    """One (GPU count, placement, redundancy, batch) point: its kernel variants (one per phase replayed apart)."""

    variant: Variant  # the point as one variant (phase -1), for labels and the summary
    batch: int  # per-GPU batch, or absolute tokens per step
    members: tuple[int, ...]  # indices of its kernel variants in the pass


def scored_phase_tokens(trace: Trace, score_start: int, chunk_tokens: int) -> np.ndarray:
    """[2] scored tokens per phase (prefill, decode): a pass over the phase column only."""
    counts = np.zeros(2, dtype=np.int64)
    t0 = 0
    for chunk in trace.iter_chunks(("phase",), chunk_tokens):
        assert chunk.phase is not None
        n = chunk.num_tokens
        if t0 + n > score_start:
            counts += np.bincount(chunk.phase[max(0, score_start - t0):], minlength=2)[:2]
        t0 += n
    return counts


def _too_short(config: PlanConfig, step: int, num_gpus: int, batch: int, scored: np.ndarray) -> str | None:
    """Why the scored part cannot fill enough steps of this size (None when it can)."""
    phases = [PHASES[config.phase]] if config.phase != "all" else [p for p in (PHASE_PREFILL, PHASE_DECODE)
                                                                     if scored[p] > 0]
    short = [p for p in phases if scored[p] // step < config.min_full_steps]
    if not short:
        return None
    size = f"{batch} tokens/GPU x {num_gpus} GPUs = {step:,} tokens per step" if config.per_gpu \
        else f"{step:,} tokens per step"
    have = ", ".join(f"{scored[p]:,} scored {PHASE_NAMES[p]} tokens ({scored[p] // step} full steps)" for p in short)
    return (f"{size} needs {config.min_full_steps} full steps per phase; the trace has {have} "
            "(record a longer trace, or lower the batch)")


def grid_points(trace: Trace, config: PlanConfig, stats: Any,
                scored: np.ndarray) -> tuple[list[GridPoint], list[Variant], list[str]]:
    """Fit every (GPU count, policy, redundancy) once and pair it with every batch; the variants of one pass."""
    meta = trace.metadata
    points: list[GridPoint] = []
    variants: list[Variant] = []
    skipped: list[str] = []
    split = config.phase == "all"
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
                for b in config.batches:
                    step = config.step_tokens(b, g)
                    point = dataclasses.replace(fitted, tokens_per_step=step)
                    name = f"{point.label} on {g} GPUs, " + (f"{b} tokens/GPU" if config.per_gpu
                                                               else f"{step} tokens/step")
                    why = _too_short(config, step, g, b, scored) if step > 0 else None
                    if why:
                        skipped.append(f"{name}: {why}")
                        continue
                    if step > 0 and split:  # prefill and decode steps apart, in the same pass
                        members = [dataclasses.replace(point, phase=p) for p in (PHASE_PREFILL, PHASE_DECODE)
                                   if scored[p] > 0]
                    else:
                        members = [point]
                    points.append(GridPoint(point, b, tuple(range(len(variants), len(variants) + len(members)))))
                    variants.extend(members)
    if not points:
        raise InputError("plan: no grid point can be built or planned; " + (skipped[0] if skipped else "empty grid"))
    return points, variants, skipped


def step_prefill_flags(seg: Segment, variants: list[Variant], members: tuple[int, ...], phase: str) -> np.ndarray:
    """[steps] True for prefill steps of a grid point, in merge_groups' step order (members in order). A member
    replaying one phase (split, or --phase) knows its steps' phase; recorded steps of both phases count as decode
    (the non-expert model's conservative side for attention over a cache)."""
    flags = []
    for m in members:
        n = sum(a.size for a in seg.step_ntok[m])  # steps of member m, without joining its arrays
        ph = variants[m].phase if variants[m].phase >= 0 else PHASES[phase]
        flags.append(np.full(n, ph == PHASE_PREFILL))
    return np.concatenate(flags) if flags else np.zeros(0, dtype=bool)


def _candidates(summaries: list[VariantSummary], ntoks: list[np.ndarray], prefill: list[np.ndarray],
                points: list[GridPoint], config: PlanConfig, ne: NonExpertWork) -> list[Candidate]:
    out = []
    for s, ntok, pre, point in zip(summaries, ntoks, prefill, points, strict=True):
        for h, gpu in enumerate(config.hardware):
            moe = np.asarray(s.step_time_series[h])  # [steps] seconds
            tokens_per_step = s.tokens / max(s.steps, 1)
            non_exp = ne.step_seconds_array(gpu, ntok / s.num_gpus, pre)  # [steps]: each step's own size
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
            ne_ms = float(non_exp.mean()) * 1e3 if non_exp.size else float("nan")
            price = gpu.price_per_gpu_hour * s.num_gpus if gpu.price_per_gpu_hour is not None else None
            out.append(Candidate(
                hardware=gpu.name, num_gpus=s.num_gpus, gpus_per_node=s.gpus_per_node, placement=s.label,
                policy=s.policy, redundant_experts=s.redundant_experts, tokens_per_step=s.tokens_per_step,
                mean_tokens_per_step=tokens_per_step, step_ms=mean_step * 1e3, step_ms_p95=float(p95) * 1e3,
                step_ms_p99=float(p99) * 1e3, moe_ms=float(moe.mean()) * 1e3 if moe.size else float("nan"),
                non_expert_ms=ne_ms,
                breakdown_ms={k: v * 1e3 for k, v in timing.breakdown.items()} | {"non_expert": ne_ms},
                tokens_per_s=tps, tokens_per_s_per_gpu=tps / s.num_gpus, imbalance=s.imbalance,
                leave_node_share=s.leave_node_share, memory_per_gpu_bytes=memory, usable_hbm_bytes=usable,
                fits_memory=fits, meets_throughput=meets_tp, meets_latency=meets_lat,
                meets_target=fits and meets_tp and meets_lat, price_per_hour=price,
                tokens_per_gpu=point.batch if config.per_gpu else 0, steps=s.steps,
                cost_per_million_tokens=price / (tps * 3600) * 1e6 if price is not None and tps > 0 else None,
            ))
    return out


def _size(c: Candidate, priced: bool) -> float:
    """What the plan minimises: cost per hour when every GPU type has a price, else the GPU count."""
    return float(c.price_per_hour) if priced and c.price_per_hour is not None else float(c.num_gpus)


def pareto_frontier(candidates: list[Candidate], priced: bool = False) -> list[Candidate]:
    """Memory- and latency-feasible candidates that no other feasible one beats on all three of size (GPUs, or cost
    per hour when priced), throughput and p95 step time; ordered by size, then throughput.

    With per-GPU batches a larger batch buys throughput with a longer step, so the frontier shows, for each cluster
    size, the trade between throughput and latency as well as what more GPUs add."""
    fit = [c for c in candidates if c.fits_memory and c.meets_latency]
    keys = [(_size(c, priced), -c.tokens_per_s, c.step_ms_p95) for c in fit]
    out = []
    for c, k in zip(fit, keys, strict=True):
        if not any(all(o <= m for o, m in zip(other, k, strict=True)) and other != k for other in keys):
            out.append(c)
    out.sort(key=lambda c: (_size(c, priced), -c.tokens_per_s, c.step_ms))
    # equal keys (same size, throughput and p95, e.g. one layout priced alike twice): keep the first
    unique: list[Candidate] = []
    for c in out:
        if not unique or (_size(c, priced), c.tokens_per_s, c.step_ms_p95) != \
                (_size(unique[-1], priced), unique[-1].tokens_per_s, unique[-1].step_ms_p95):
            unique.append(c)
    return unique


def _money(x: float | None) -> str:
    return "no price" if x is None else f"{x:,.2f}/h"


def _lacks(c: Candidate, config: PlanConfig) -> str:
    """What keeps a candidate from the goal, in words."""
    why = []
    if not c.fits_memory:
        why.append(f"weights {c.memory_per_gpu_bytes / 1e9:.1f} GB per GPU do not fit the "
                   f"{c.usable_hbm_bytes / 1e9:.1f} GB usable")
    if not c.meets_throughput:
        short = 1 - c.tokens_per_s / config.target_tokens_per_s
        why.append(f"{c.tokens_per_s:,.0f} tokens/s is {short:.0%} below target")
    if not c.meets_latency:
        why.append(f"p95 step {c.step_ms_p95:.3g} ms is over the {config.max_step_ms:g} ms bound")
    return "; ".join(why) or "meets the goal"


def recommend(candidates: list[Candidate], config: PlanConfig) -> tuple[Candidate | None, list[str]]:
    """The goal-meeting candidate with the lowest cost per hour (every GPU priced) or fewest GPUs, then the lowest
    mean step time; with the reasons."""
    priced = config.priced
    ok = sorted((c for c in candidates if c.meets_target), key=lambda c: (_size(c, priced), c.step_ms, c.num_gpus))
    target = f"{config.target_tokens_per_s:,.0f} tokens/s"
    lat = f"p95 step <= {config.max_step_ms:g} ms" if config.max_step_ms is not None else "no latency bound"
    reserve = f"{config.hbm_reserve:.0%} of HBM reserved for KV cache and activations"
    unpriced = sorted({g.name for g in config.hardware if g.price_per_gpu_hour is None})
    ranking = ("ranked by cost per hour (prices given for every GPU type), then mean step time" if priced else
               f"ranked by fewest GPUs, then mean step time: prices were not given for {', '.join(unpriced)} "
               "(--gpu-hour-cost or price_per_gpu_hour in a hardware file ranks by cost)")
    reasons = []
    if not ok:
        best = max(candidates, key=lambda c: (c.fits_memory and c.meets_latency, c.tokens_per_s))
        reasons.append(f"no layout meets {target} with {lat} and {reserve}")
        reasons.append(f"closest: {best.describe()}: {_lacks(best, config)}")
        reasons.append(ranking)
        return None, reasons
    rec = ok[0]
    margin = rec.tokens_per_s / config.target_tokens_per_s - 1
    reasons.append(f"{rec.describe()}: {rec.tokens_per_s:,.0f} tokens/s meets the target {target} by {margin:.0%} "
                   f"({rec.tokens_per_s_per_gpu:,.0f} per GPU, {rec.mean_tokens_per_step:,.0f} tokens per step "
                   f"over {rec.steps} scored steps)")
    bound = (f"within the {config.max_step_ms:g} ms bound ({1 - rec.step_ms_p95 / config.max_step_ms:.0%} headroom)"
             if config.max_step_ms is not None else "no latency bound given (--max-step-ms)")
    reasons.append(f"step time mean {rec.step_ms:.3g} ms, p95 {rec.step_ms_p95:.3g} ms, {bound}; "
                   f"MoE {rec.moe_ms:.3g} ms + non-expert {rec.non_expert_ms:.3g} ms")
    reasons.append(f"memory fits with {(rec.usable_hbm_bytes - rec.memory_per_gpu_bytes) / 1e9:.1f} GB free: "
                   f"weights {rec.memory_per_gpu_bytes / 1e9:.1f} GB per GPU of {rec.usable_hbm_bytes / 1e9:.1f} GB "
                   f"usable ({reserve})")
    if rec.price_per_hour is not None and rec.cost_per_million_tokens is not None:
        reasons.append(f"costs {_money(rec.price_per_hour)} for the cluster, {rec.cost_per_million_tokens:.4g} per "
                       "million tokens at the predicted throughput")
    reasons.append(ranking)
    # the next goal-meeting layout in the ranking (another GPU type or count), and what it costs more
    others = [c for c in ok if (c.hardware, c.num_gpus) != (rec.hardware, rec.num_gpus)]
    if others:
        nxt = others[0]
        if priced:
            assert nxt.price_per_hour is not None and rec.price_per_hour is not None
            extra = (f"costs {_money(nxt.price_per_hour)} ({nxt.price_per_hour / rec.price_per_hour - 1:+.0%})"
                     if nxt.price_per_hour != rec.price_per_hour else "costs the same but has a longer step "
                     f"({nxt.step_ms:.3g} ms)")
        else:
            extra = (f"needs {nxt.num_gpus} GPUs" if nxt.num_gpus != rec.num_gpus
                     else f"same GPU count but a longer step ({nxt.step_ms:.3g} ms)")
        reasons.append(f"runner-up {nxt.describe()} also meets the goal but {extra}")
    # the best layout that would have been cheaper (or used fewer GPUs), and what it lacked
    smaller = [c for c in candidates if _size(c, priced) < _size(rec, priced)]
    if smaller:
        best = max(smaller, key=lambda c: (c.fits_memory and c.meets_latency, c.tokens_per_s))
        what = (f"cheaper ({_money(best.price_per_hour)})" if priced else "with fewer GPUs")
        reasons.append(f"best layout {what}: {best.describe()}: {_lacks(best, config)}")
    same = [c for c in candidates if c.num_gpus == rec.num_gpus and c.hardware == rec.hardware
            and c.tokens_per_step == rec.tokens_per_step and c.placement != rec.placement]
    failing = [c for c in same if not c.meets_target]
    if failing:
        worst = ", ".join(f"{c.placement} ({c.tokens_per_s:,.0f} tokens/s, imbalance {c.imbalance:.2f})"
                          for c in sorted(failing, key=lambda c: c.tokens_per_s)[:3])
        reasons.append(f"on the same GPUs and batch these placements miss the goal: {worst}")
    return rec, reasons


def plan(trace: Trace, config: PlanConfig, progress: Progress | None = None) -> PlanResult:
    """Fit every grid placement, replay them all in one pass, price them on every GPU type, and recommend one."""
    meta = trace.metadata
    if trace.num_tokens == 0:
        raise InputError(f"{trace.paths[0]}: trace has no tokens")
    steps = [config.step_tokens(b, g) for b in config.batches for g in config.gpus]
    stats = fit_statistics(trace, fit_fraction=config.fit_fraction, phase=config.phase,
                           tokens_per_step=min(steps),
                           with_coselection=any(p in NEEDS_COSELECTION for p in config.placements),
                           chunk_tokens=config.chunk_tokens)
    if stats.score_start >= trace.num_tokens:
        raise InputError(f"{trace.paths[0]}: nothing left to score after fitting (lower --fit-fraction)")
    scored = scored_phase_tokens(trace, stats.score_start, config.chunk_tokens)
    if config.phase != "all":
        scored[1 - PHASES[config.phase]] = 0
    if scored.sum() == 0:
        raise InputError(f"{trace.paths[0]}: no {config.phase} tokens to score")
    points, variants, skipped = grid_points(trace, config, stats, scored)
    seg = run_variants(trace, variants, config.hardware, phase=config.phase, score_start=stats.score_start,
                       capacity_factor=config.capacity_factor, chunk_tokens=config.chunk_tokens, progress=progress)
    prefill = [step_prefill_flags(seg, variants, p.members, config.phase) for p in points]
    merged = merge_groups(seg, [p.members for p in points])  # prefill and decode variants of each point
    summaries = summarise(merged, [p.variant for p in points], config.hardware, meta, hbm_reserve=config.hbm_reserve)
    ntoks = [merged.series(i)[2] for i in range(len(points))]
    ne = non_expert_work(meta, config.context_tokens)
    candidates = _candidates(summaries, ntoks, prefill, points, config, ne)
    rec, reasons = recommend(candidates, config)
    cfg = dataclasses.asdict(config) | {"hardware": [g.to_dict() for g in config.hardware]}
    return PlanResult(
        config=cfg, trace=[str(p) for p in trace.paths], fit_tokens=stats.fit_tokens, score_start=stats.score_start,
        non_expert={"flops_per_token": ne.flops_per_token, "weight_bytes": ne.weight_bytes,
                    "assumptions": list(ne.assumptions)},
        candidates=candidates, frontier=pareto_frontier(candidates, config.priced), recommendation=rec,
        reasons=reasons, skipped=skipped, variants=summaries,
        scored_tokens={"prefill": int(scored[PHASE_PREFILL]), "decode": int(scored[PHASE_DECODE])},
        pricing={g.name: pricing_for(g, meta).to_dict() for g in config.hardware},
    )
