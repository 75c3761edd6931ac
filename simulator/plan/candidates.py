"""Plan candidates: each grid point priced on each GPU type, the Pareto frontier, and the recommendation."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from simulator.cost_model import NonExpertWork
from simulator.plan.config import LATENCY_PERCENTILE, PlanConfig
from simulator.plan.grid import GridPoint
from simulator.replay import VariantSummary


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
    step_imbalance: float  # simulator.metrics: the headline, per-step busiest over mean GPU load
    aggregate_imbalance: float  # simulator.metrics: the whole scored part as one step
    sglang_balancedness: float  # simulator.metrics: the engines' own figures over the same steps
    vllm_balancedness: float
    leave_node_share: float
    memory_per_gpu_bytes: float  # expert weights with replicas + non-expert weights
    usable_hbm_bytes: float  # HBM x (1 - reserve)
    fits_memory: bool
    meets_throughput: bool
    meets_latency: bool
    meets_target: bool
    price_per_hour: float | None = None  # GPUs x price_per_gpu_hour when the hardware has a price
    # per-GPU batch of the grid point (0: the batch axis was absolute tokens per step)
    tokens_per_gpu: int = 0
    steps: int = 0  # scored steps the prediction rests on
    cost_per_million_tokens: float | None = None  # price_per_hour / (tokens/s x 3600) x 1e6

    def batch(self) -> str:
        if self.tokens_per_gpu:
            return f"{self.tokens_per_gpu} tokens/GPU ({self.tokens_per_step} per step)"
        return "recorded steps" if self.tokens_per_step == 0 else f"{self.tokens_per_step} tokens/step"

    def describe(self) -> str:
        return f"{self.num_gpus} x {self.hardware}, {self.placement}, {self.batch()}"




def price_candidates(summaries: list[VariantSummary], ntoks: list[np.ndarray], prefill: list[np.ndarray],
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
            tokens_per_s = s.tokens / float(total.sum()) if total.size and total.sum() > 0 else 0.0
            timing = s.timings[h]
            memory = timing.expert_memory_bytes + ne.weight_bytes
            usable = gpu.hbm_bytes * (1 - config.hbm_reserve)
            fits = memory <= usable
            meets_tp = tokens_per_s >= config.target_tokens_per_s
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
                tokens_per_s=tokens_per_s, tokens_per_s_per_gpu=tokens_per_s / s.num_gpus,
                step_imbalance=s.step_imbalance, aggregate_imbalance=s.aggregate_imbalance,
                sglang_balancedness=s.sglang_balancedness, vllm_balancedness=s.vllm_balancedness,
                leave_node_share=s.leave_node_share, memory_per_gpu_bytes=memory, usable_hbm_bytes=usable,
                fits_memory=fits, meets_throughput=meets_tp, meets_latency=meets_lat,
                meets_target=fits and meets_tp and meets_lat, price_per_hour=price,
                tokens_per_gpu=point.batch if config.per_gpu else 0, steps=s.steps,
                cost_per_million_tokens=(price / (tokens_per_s * 3600) * 1e6 if price is not None
                                         and tokens_per_s > 0
                                         else None),
            ))
    return out


def _size(c: Candidate, priced: bool) -> float:
    """What the plan minimises: cost per hour when every GPU type has a price, else the GPU count."""
    return float(c.price_per_hour) if priced and c.price_per_hour is not None else float(c.num_gpus)


def pareto_frontier(candidates: list[Candidate], priced: bool = False) -> list[Candidate]:
    """Memory- and latency-feasible candidates that no other feasible one beats on all three of size (GPUs, or
    cost per hour when priced), throughput and p95 step time; ordered by size, then throughput.

    With per-GPU batches a larger batch buys throughput with a longer step, so the frontier shows, for each
    cluster size, the trade between throughput and latency as well as what more GPUs add."""
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
    """The goal-meeting candidate with the lowest cost per hour (every GPU priced) or fewest GPUs, then the
    lowest mean step time; with the reasons."""
    priced = config.priced
    ok = sorted((c for c in candidates if c.meets_target),
                key=lambda c: (_size(c, priced), c.step_ms, c.num_gpus))
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
    reasons.append(f"{rec.describe()}: {rec.tokens_per_s:,.0f} tokens/s meets the target {target} by "
                   f"{margin:.0%} ({rec.tokens_per_s_per_gpu:,.0f} per GPU, {rec.mean_tokens_per_step:,.0f} "
                   f"tokens per step over {rec.steps} scored steps)")
    bound = (f"within the {config.max_step_ms:g} ms bound ({1 - rec.step_ms_p95 / config.max_step_ms:.0%} "
             "headroom)"
             if config.max_step_ms is not None else "no latency bound given (--max-step-ms)")
    reasons.append(f"step time mean {rec.step_ms:.3g} ms, p95 {rec.step_ms_p95:.3g} ms, {bound}; "
                   f"MoE {rec.moe_ms:.3g} ms + non-expert {rec.non_expert_ms:.3g} ms")
    reasons.append(f"memory fits with {(rec.usable_hbm_bytes - rec.memory_per_gpu_bytes) / 1e9:.1f} GB free: "
                   f"weights {rec.memory_per_gpu_bytes / 1e9:.1f} GB per GPU of "
                   f"{rec.usable_hbm_bytes / 1e9:.1f} GB usable ({reserve})")
    if rec.price_per_hour is not None and rec.cost_per_million_tokens is not None:
        reasons.append(f"costs {_money(rec.price_per_hour)} for the cluster, "
                       f"{rec.cost_per_million_tokens:.4g} per million tokens at the predicted throughput")
    reasons.append(ranking)
    # the next goal-meeting layout in the ranking (another GPU type or count), and what it costs more
    others = [c for c in ok if (c.hardware, c.num_gpus) != (rec.hardware, rec.num_gpus)]
    if others:
        nxt = others[0]
        if priced:
            assert nxt.price_per_hour is not None and rec.price_per_hour is not None
            extra = (f"costs {_money(nxt.price_per_hour)} "
                     f"({nxt.price_per_hour / rec.price_per_hour - 1:+.0%})"
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
        worst = ", ".join(f"{c.placement} ({c.tokens_per_s:,.0f} tokens/s, step imbalance "
                          f"{c.step_imbalance:.2f})"
                          for c in sorted(failing, key=lambda c: c.tokens_per_s)[:3])
        reasons.append(f"on the same GPUs and batch these placements miss the goal: {worst}")
    return rec, reasons


