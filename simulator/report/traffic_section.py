"""The report's section on all-to-all traffic against step imbalance, from the trade-off curve."""

from __future__ import annotations

from simulator import metrics
from simulator.report import figures
from simulator.report.format import fmt_bytes, fmt_num, fmt_pct
from simulator.report.model import Section, Table
from simulator.traffic.tradeoff import TradeoffCurve

TRAFFIC_TOLERANCE = 0.02  # the step imbalance growth the section's headline allows


def traffic_section(curve: TradeoffCurve | None) -> Section:
    """The report's traffic section from the trade-off curve (None: not computed)."""
    title = "All-to-all traffic against step imbalance"
    if curve is None:
        return Section("traffic", title, ["The trade-off was not computed for this report."], [], [])
    rows: list[list[str]] = []
    curves: dict[str, tuple[list[float], list[float]]] = {}
    points: dict[str, tuple[float, float]] = {}
    for p in curve.points:
        model = p.score.dispatch_model
        rows.append([p.label, model, fmt_bytes(p.score.all_to_all_bytes_per_token),
                     fmt_pct(p.bytes_change), fmt_num(p.score.step_imbalance), fmt_pct(p.imbalance_change)])
        if p.budget is None:
            if model == "home" or p.policy != "balanced":
                points[f"{p.policy} ({model})"] = (p.score.step_imbalance, p.score.all_to_all_bytes_per_token)
            continue
        imb, nbytes = curves.setdefault(f"{p.policy} ({model})", ([], []))
        imb.append(p.score.step_imbalance)
        nbytes.append(p.score.all_to_all_bytes_per_token)
    table = Table(
        columns=["placement", "dispatch model", "all-to-all / token", "vs balanced", "step imbalance",
                 "vs balanced"],
        rows=rows, numeric=[False, False, True, True, True, True],
        caption=f"Traffic-aware policies at several step budgets on {curve.num_gpus} GPUs"
                + (f" with {curve.redundant_experts} redundant slots" if curve.redundant_experts else ""),
        legend="budget: how much the fit part's sampled steps' summed busiest-GPU load may grow over the "
               "balanced (or replicated) start's; dispatch model home: a token returns to its home GPU after "
               "every layer (what replay charges); stay: it stays where its top-1 expert ran (ExFlow); "
               "all-to-all: dispatch + combine bytes per token over all layers; vs balanced: against "
               f"`balanced` returning home; {metrics.STEP_IMBALANCE}",
    )
    best = curve.best_within(TRAFFIC_TOLERANCE)
    lead = ("No placement cuts traffic without raising the step imbalance more than "
            f"{fmt_pct(TRAFFIC_TOLERANCE)}." if best is None or best.bytes_change >= 0 else
            f"Within {fmt_pct(TRAFFIC_TOLERANCE)} more step imbalance than `balanced`, {best.label} with "
            "tokens "
            f"{'staying' if best.score.dispatch_model == 'stay' else 'returning home'} moves "
            f"{fmt_pct(-best.bytes_change)} fewer all-to-all bytes.")
    paragraphs = [
        lead,
        "Keeping experts that tokens choose together on one GPU cuts the unique (token, GPU) pairs that "
        "dispatch and combine move, but a step's tokens then pile onto fewer GPUs, so the step imbalance, "
        "which sets expert time, rises with it; the budget trades one against the other.",
    ]
    if curve.skipped:
        paragraphs.append("Not fitted: " + "; ".join(curve.skipped) + ".")
    return Section("traffic", title, paragraphs, [table], [figures.traffic_tradeoff(curves, points)])
