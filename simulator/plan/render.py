"""`render_plan(result) -> str`: the frontier (or every grid point) with its legend, skipped points, what
priced each GPU type, and the recommendation with its reasons."""

from __future__ import annotations

from rich.table import Table

from simulator import metrics, tables, units
from simulator.plan import Candidate, PlanResult


def render_plan(result: PlanResult, *, show_all: bool = False, width: int | None = None,
                color: bool = False) -> str:
    """Everything `moe-sim plan` prints, as text (rich markup as colour only with `color`)."""
    rows = result.candidates if show_all else list(result.frontier)
    if result.recommendation is not None and result.recommendation not in rows:
        rows.append(result.recommendation)
    title = f"{'All grid points' if show_all else 'Frontier'} ({len(result.candidates)} candidates)"
    items: list[str | Table] = [plan_table(result, rows, title)]
    if result.skipped:  # one short line: which points, and the first reason (--json has every reason)
        points = [line.split(": ", 1)[0] for line in result.skipped]
        first = result.skipped[0].split(": ", 1)[-1]
        shown = "; ".join(points[:6]) + (f"; and {len(points) - 6} more" if len(points) > 6 else "")
        items.append(f"[dim]skipped {len(points)} grid point(s) that cannot be built or planned: {shown} "
                     f"(first reason: {first}; --json lists every reason)[/dim]")
    items.append(f"[dim]replicas: each step's tokens of an expert split by --dispatch "
                 f"{result.config.get('dispatch', 'static')}[/dim]")
    if rows:
        items.append(balancedness_line(result.recommendation or rows[0]))
    for name, priced in result.pricing.items():
        items.append(f"[dim]{name}: expert time {priced['expert_time']}; non-expert "
                     f"{priced['non_expert_time']}; all-to-all {priced['all_to_all']}[/dim]")
    items.append(f"[bold]{'Recommendation' if result.recommendation else 'No recommendation'}[/bold]")
    items += [f"  - {reason}" for reason in result.reasons]
    return tables.to_text(*items, width=width, color=color)


def balancedness_line(c: Candidate) -> str:
    """The serving engines' balance figures for one candidate, beside moe-trace's (the table has no room)."""
    return (f"[dim]{c.describe()}: SGLang balancedness {units.sig(c.sglang_balancedness)}, vLLM balancedness "
            f"{units.sig(c.vllm_balancedness)} against step imbalance {units.sig(c.step_imbalance)} (mean "
            "over steps of each step's mean over busiest GPU load, per layer for SGLang, layer-summed for "
            "vLLM; --json has every candidate's)[/dim]")


def _batch_cell(c: Candidate) -> str:
    if c.tokens_per_gpu:
        return f"{units.si(c.tokens_per_gpu)} x {c.num_gpus}"
    return "recorded" if c.tokens_per_step == 0 else units.si(c.tokens_per_step)


def plan_table(result: PlanResult, rows: list[Candidate], title: str) -> Table:
    """One row per candidate layout (fits 120 columns); whole-model step times. When priced, cost per hour and
    per million tokens take the place of tokens/s per GPU and imbalance (both stay in --json)."""
    priced = any(c.price_per_hour is not None for c in rows)
    per_gpu = any(c.tokens_per_gpu for c in rows)
    columns = [("GPUs", "left"), ("placement", "left"),
               ("tokens/GPU\nx GPUs" if per_gpu else "tokens\n/step", "right"), ("step\nmean", "right"),
               ("step\np95", "right"), ("tokens/s", "right")]
    columns += [("cost\n/hour", "right"), ("cost /\nM tokens", "right")] if priced else \
        [("tokens/s\n/GPU", "right"), ("step\nimbalance", "right")]
    legend = ("step mean / p95: predicted whole-model step time; tokens/s: whole cluster, whole model; "
              + ("cost / M tokens: cost per hour over the predicted throughput; " if priced else
                 f"{metrics.STEP_IMBALANCE}; ")
              + "memory/GPU: expert weights with replicas plus non-expert weights; fits: memory within HBM x "
              "(1 - reserve); meets: fits, reaches the target throughput and keeps p95 within --max-step-ms")
    table = tables.table(title, columns + [("memory\n/GPU", "right"), ("fits", "right"), ("meets", "right")],
                         legend)
    for c in rows:
        cells = [f"{c.num_gpus} x {c.hardware}", c.placement, _batch_cell(c), units.seconds(c.step_ms / 1e3),
                 units.seconds(c.step_ms_p95 / 1e3), units.si(c.tokens_per_s)]
        if priced:
            cells += [units.sig(c.price_per_hour) if c.price_per_hour is not None else "-",
                      units.sig(c.cost_per_million_tokens) if c.cost_per_million_tokens is not None else "-"]
        else:
            cells += [units.si(c.tokens_per_s_per_gpu), units.sig(c.step_imbalance)]
        cells += [units.nbytes(c.memory_per_gpu_bytes), "yes" if c.fits_memory else "[red]no[/red]",
                  "[green]yes[/green]" if c.meets_target else "no"]
        table.add_row(*cells)
    return table


