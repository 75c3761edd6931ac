"""The report's first section (recommendation and frontier, from simulator.plan) and the time-breakdown plot.

Without a plan (no throughput target given) the section names the replayed placement with the shortest
predicted MoE step on the replayed layout, and says that no layouts were swept.
"""

from __future__ import annotations

from simulator import metrics
from simulator.plan import Candidate, PlanResult
from simulator.replay import ReplayResult
from simulator.report import figures
from simulator.report.format import fmt_int, fmt_ms, fmt_num, fmt_pct
from simulator.report.model import Details, Figure, Section, Table

MAX_BREAKDOWN_BARS = 16  # layouts drawn in the time breakdown (the best placement of each)


def _batch(c: Candidate) -> str:
    if c.tokens_per_gpu:
        return f"{c.tokens_per_gpu} x {c.num_gpus}"
    return "recorded" if c.tokens_per_step == 0 else str(c.tokens_per_step)


def _short(c: Candidate) -> str:
    batch = "" if c.tokens_per_step == 0 else f", {_batch(c)} tok/step"
    return f"{c.num_gpus}x{c.hardware} {c.placement}{batch}"


def best_per_layout(plan: PlanResult) -> list[Candidate]:
    """For each (hardware, GPU count, tokens per step), the candidate with the highest throughput among those
    whose memory fits (else the highest overall), ordered by hardware then GPU count."""
    best: dict[tuple[str, int, int], Candidate] = {}
    for c in plan.candidates:
        key = (c.hardware, c.num_gpus, c.tokens_per_step)
        old = best.get(key)
        if old is None or (c.fits_memory, c.tokens_per_s) > (old.fits_memory, old.tokens_per_s):
            best[key] = c
    return [best[k] for k in sorted(best)]


CANDIDATE_LEGEND = (
    "rec.: the recommended layout; step ms / p95: predicted whole-model step time; tokens/s: whole cluster, "
    f"whole model; {metrics.STEP_IMBALANCE}; {metrics.SGLANG_BALANCEDNESS}; {metrics.VLLM_BALANCEDNESS}; "
    "leave node: share of assignments served on another node; "
    "memory: expert weights with replicas plus non-expert weights per GPU, against HBM x (1 - reserve); "
    "meets target: fits in memory, reaches the throughput target and keeps p95 within the latency bound")


def candidate_table(plan: PlanResult, rows_in: list[Candidate], caption: str) -> Table:
    rec = plan.recommendation
    priced = any(c.price_per_hour is not None for c in rows_in)
    rows = []
    for c in rows_in:
        rows.append([
            "yes" if c is rec else "", c.hardware, str(c.num_gpus), c.placement,
            _batch(c), fmt_num(c.step_ms),
            fmt_num(c.step_ms_p95), fmt_int(c.tokens_per_s), fmt_int(c.tokens_per_s_per_gpu),
            fmt_num(c.step_imbalance), fmt_num(c.sglang_balancedness), fmt_num(c.vllm_balancedness),
            fmt_pct(c.leave_node_share),
            f"{c.memory_per_gpu_bytes / 2**30:.2f} / {c.usable_hbm_bytes / 2**30:.2f}",
            "yes" if c.meets_target else "no",
        ] + ([_price(c.price_per_hour), _price(c.cost_per_million_tokens)] if priced else []))
    return Table(
        columns=["rec.", "GPU", "GPUs", "placement", "tokens/step (per GPU x GPUs)", "step ms", "step ms p95",
                 "tokens/s", "tokens/s / GPU", "step imbalance", "SGLang balancedness", "vLLM balancedness",
                 "leave node", "memory / usable GiB", "meets target"]
        + (["cost / hour", "cost / M tokens"] if priced else []),
        rows=rows,
        numeric=[False, False, True, False, True, True, True, True, True, True, True, True, True, True, False]
        + ([True, True] if priced else []),
        caption=caption,
        legend=CANDIDATE_LEGEND,
    )


def _price(x: float | None) -> str:
    return "-" if x is None else f"{x:,.4g}"


def plan_section(plan: PlanResult | None, replay: ReplayResult) -> Section:
    if plan is None:
        best = min(replay.placements, key=lambda p: p.timings[0].step_time["mean"])
        t = best.timings[0]
        cfg = replay.config
        return Section("recommendation", "Recommendation", [
            "No throughput target was given, so no layouts were swept (pass --target-tokens-per-s to plan). "
            f"On the replayed layout, {cfg['num_gpus']} x {cfg['hardware']['name']}, the {best.label} "
            f"placement has the shortest predicted MoE step: {fmt_ms(t.step_time['mean'])} ms on average, "
            f"{fmt_int(t.tokens_per_s_per_gpu)} tokens/s per GPU for the MoE layers, step imbalance "
            f"{fmt_num(best.step_imbalance)}.",
        ])
    rec = plan.recommendation
    if rec is not None:
        head = (f"Recommended: {rec.describe()}, predicted {fmt_int(rec.tokens_per_s)} tokens/s for the "
                f"whole model ({fmt_num(rec.step_ms)} ms per step, p95 {fmt_num(rec.step_ms_p95)} ms).")
    else:
        head = "No layout in the sweep meets the goal; the frontier below shows what comes closest."
    target = fmt_int(plan.config.get("target_tokens_per_s", float("nan")))
    frontier = candidate_table(plan, plan.frontier,
                               f"Frontier: layouts no other beats at once on GPUs (cost per "
                                                    "hour when every GPU is priced), throughput and p95 "
                                                    f"step time ({len(plan.candidates)} grid points, target "
                                                    f"{target} tokens/s)")
    details = [Details(f"Skipped {len(plan.skipped)} grid point{'s' if len(plan.skipped) != 1 else ''} that "
                       "cannot be built or planned", list(plan.skipped))] if plan.skipped else []
    return Section("recommendation", "Recommendation", [head],
                   [candidate_table(plan, best_per_layout(plan), "Best placement on each layout swept")],
                   bullets=list(plan.reasons), lead=[frontier], details=details)


def time_breakdown_figure(plan: PlanResult | None, replay: ReplayResult) -> Figure:
    """Mean time per step by component: the best placement of each swept layout (whole model, from the plan),
    else the replayed placements (MoE layers only)."""
    comps = ("compute", "weights", "dispatch", "combine")
    if plan is not None and plan.candidates:
        shown = best_per_layout(plan)[:MAX_BREAKDOWN_BARS]
        rec = plan.recommendation
        # the recommendation takes its layout's bar, or a bar of its own
        if rec is not None and rec not in shown:
            same = [i for i, c in enumerate(shown)
                    if (c.hardware, c.num_gpus, c.tokens_per_step)
                    == (rec.hardware, rec.num_gpus, rec.tokens_per_step)]
            if same:
                shown[same[0]] = rec
            else:
                shown.append(rec)
        parts = {c: [x.breakdown_ms[c] / 1e3 for x in shown] for c in (*comps, "non_expert")}
        return figures.time_breakdown([_short(c) for c in shown], parts,
                                      highlight=shown.index(rec) if rec is not None else None)
    parts = {c: [p.timings[0].breakdown[c] for p in replay.placements] for c in comps}
    return figures.time_breakdown([p.label for p in replay.placements], parts)
