"""`moe-sim report` (HTML or Markdown capacity-planning report) and `moe-sim rebalance` (how often to refit)."""

from __future__ import annotations

import json
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import click
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from rich.table import Table

from simulator.commands import _int_list, _names
from simulator.commands import plan as plan_cmd
from simulator.hardware import ClusterLayout, parse_hardware_list
from simulator.plan import apply_prices, parse_gpu_hour_cost
from simulator.rebalance import (
    RebalanceConfig,
    RebalanceResult,
    count_steps,
    default_intervals,
    default_window,
    passes_needed,
    rebalance_trace,
)
from simulator.replay import DEFAULT_PLACEMENTS, PHASES
from simulator.report.format import fmt_bytes, fmt_num
from traces.errors import InputError
from traces.reader import open_trace


@contextmanager
def _bars(quiet: bool) -> Iterator[Callable[[str, int], Callable[[int], None] | None]]:
    """A rich progress display; each pass over the trace gets its own bar."""
    if quiet:
        yield lambda label, total: None
        return
    columns = (TextColumn("{task.description:>9}"), BarColumn(), MofNCompleteColumn(), TextColumn("tokens"),
               TimeRemainingColumn())
    with Progress(*columns, console=Console(stderr=True), transient=True) as progress:
        def factory(label: str, total: int) -> Callable[[int], None]:
            task = progress.add_task(label, total=total)
            return lambda n: progress.advance(task, n)

        yield factory


def _options_from(source: click.Command, *names: str) -> Callable[[click.Command], click.Command]:
    """Give a command some of another command's options (same flags, defaults and help), so the two stay in step."""
    by_name = {p.name: p for p in source.params}

    def decorate(command: click.Command) -> click.Command:
        command.params.extend(by_name[n] for n in names)
        return command

    return decorate


def _every(text: str | None) -> tuple[int, ...]:
    return tuple(_int_list(text, "--rebalance-every")) if text else ()


# Options shared by both commands: the rebalance schedule and the layout it is fitted for.
def _rebalance_options(fn: Callable[..., Any]) -> Callable[..., Any]:
    options = [
        click.option("--rebalance-every", "rebalance_every", default=None, metavar="W[,W...]",
                     help="Refit the placement every W steps (comma-separated to compare several; default: a "
                          "spread from 1 step to the trace's length)."),
        click.option("--window", type=int, default=None, metavar="N",
                     help="Each refit uses the load of the last N steps (default: an eighth of the steps, at most "
                          "1000). The first N steps are only fitted on, never scored."),
        click.option("--tokens-per-step", type=int, default=0, show_default=True,
                     help="Regroup tokens into steps of this many (0: the recorded forward passes)."),
        click.option("--phase", type=click.Choice(list(PHASES)), default="all", show_default=True,
                     help="Use prefill tokens, decode tokens, or both."),
        click.option("--gpus-per-node", type=int, default=8, show_default=True, help="GPUs per node."),
        click.option("--quiet", is_flag=True, help="No progress bar."),
    ]
    for option in reversed(options):
        fn = option(fn)
    return fn


# ------------------------------------------------------------------------------------------------- rebalance


def rebalance_table(results: list[RebalanceResult]) -> Table:
    first = results[0]
    s = first.settings
    table = Table(title=f"Refit from the last {first.window} steps, {s.get('policy')} on {s.get('num_gpus')} GPUs "
                        f"({first.scored_steps} of {first.steps} steps scored)", title_style="bold")
    for col in ("refit every", "refits", "imbalance mean", "p95", "fixed", "oracle", "moved / refit",
                "moved / step"):
        table.add_column(col, justify="right")
    for r in results:
        table.add_row(
            str(r.every), str(r.rebalances), fmt_num(r.mean_imbalance("rebalanced")),
            fmt_num(r.percentile("rebalanced", 95)), fmt_num(r.mean_imbalance("fixed")),
            fmt_num(r.mean_imbalance("oracle")),
            fmt_bytes(float(r.moved_bytes.mean())) if r.rebalances else "0 B",
            fmt_bytes(float(r.moved_bytes.sum()) / max(r.scored_steps, 1)),
        )
    return table


@click.command("rebalance")
@click.argument("trace", nargs=-1, required=True)
@_rebalance_options
@click.option("--gpus", type=int, default=8, show_default=True, help="Number of GPUs serving the experts.")
@click.option("--placement", "policy", default="balanced", show_default=True,
              help="Policy refitted at each rebalance: balanced, replicated, replicated-hier, contiguous, round-robin.")
@click.option("--redundant-experts", type=int, default=0, show_default=True,
              help="Extra expert slots for the replicated policies.")
@click.option("--json", "as_json", is_flag=True, help="Print the results as JSON on stdout instead of a table.")
@click.option("--series", is_flag=True, help="With --json, include every scored step's imbalance.")
def rebalance(trace: tuple[str, ...], rebalance_every: str | None, window: int | None, tokens_per_step: int,
              phase: str, gpus_per_node: int, quiet: bool, gpus: int, policy: str, redundant_experts: int,
              as_json: bool, series: bool) -> None:
    """Replay periodic rebalancing over TRACE: refit the placement every W steps from the last N steps' load.

    Each interval is scored on the steps that follow the refit, against a placement fitted once on the first
    window (fixed) and one fitted on the scored steps themselves (oracle); weights moved per refit are counted.
    """
    ClusterLayout(gpus, gpus_per_node)
    with open_trace(list(trace)) as tr:
        phase_name = None if phase == "all" else phase
        tps = tokens_per_step or None
        steps = count_steps(tr, phase=phase_name, tokens_per_step=tps)
        n = window if window is not None else default_window(steps)
        config = RebalanceConfig(
            every=_every(rebalance_every) or default_intervals(steps, n), window=n, policy=policy, num_gpus=gpus,
            gpus_per_node=gpus_per_node, redundant_experts=redundant_experts, phase=phase_name, tokens_per_step=tps,
        )
        config.fit_function(tr.metadata.num_experts)  # a layout the policy cannot fill fails before the bar
        with _bars(quiet or as_json) as bars:
            results = rebalance_trace(tr, config, progress=bars("rebalance", tr.num_tokens * passes_needed(
                config.every, tr.metadata.num_moe_layers, tr.metadata.num_experts)))
    if as_json:
        json.dump({"trace": [str(p) for p in tr.paths], "results": [r.to_dict(series) for r in results]},
                  sys.stdout)
        sys.stdout.write("\n")
        return
    console = Console(soft_wrap=False, width=max(120, Console().width))
    console.print(rebalance_table(results))
    best = min(results, key=lambda r: r.mean_imbalance("rebalanced"))
    console.print(f"Best: refit every [bold]{best.every}[/bold] steps, mean imbalance "
                  f"{best.mean_imbalance('rebalanced'):.3f} (fixed {best.mean_imbalance('fixed'):.3f}, oracle "
                  f"{best.mean_imbalance('oracle'):.3f}), moving "
                  f"{fmt_bytes(float(best.moved_bytes.mean()) if best.rebalances else 0.0)} per refit.")


# ---------------------------------------------------------------------------------------------------- report


@_options_from(plan_cmd, "redundant_experts", "max_step_ms", "fit_fraction", "capacity_factor", "hbm_reserve",
               "context_tokens", "tokens_per_gpu", "gpu_hour_cost", "load_file", "load_model", "load_tokens")
@click.command("report")
@click.argument("trace", nargs=-1, required=False)
@click.option("-o", "--output", required=True, type=click.Path(dir_okay=False),
              help="Report file: .html (self-contained, plots embedded) or .md (PNG plots in <name>_files/).")
@click.option("--force", is_flag=True, help="Overwrite an existing report (and its _files folder).")
@click.option("--target-tokens-per-s", type=float, default=None,
              help="Whole-model throughput to reach; sweeps the layouts and recommends one (default: no sweep, "
                   "the first --gpus and --hardware are replayed).")
@click.option("--hardware", default="h100", show_default=True,
              help="Comma-separated GPU presets (h100, h200, b200, a100, mi300x) or YAML/JSON files.")
@click.option("--gpus", default="8,16,32,64", show_default=True,
              help="Comma-separated GPU counts for the sweep; the first is replayed when there is no target.")
@click.option("--placements", default=",".join(DEFAULT_PLACEMENTS), show_default=True,
              help="Placements compared on the replayed layout.")
@click.option("--plan-placements", default="contiguous,balanced,replicated", show_default=True,
              help="Placements swept by the plan.")
@click.option("--rebalance-placement", default=None,
              help="Policy refitted in the rebalance section (default: replicated with redundant slots, else "
                   "balanced).")
@click.option("--segments", type=int, default=8, show_default=True,
              help="Equal slices of the trace compared in the routing-stability analysis.")
@_rebalance_options
@click.option("--json", "as_json", is_flag=True, help="Also print the report's numbers as JSON on stdout.")
def report(trace: tuple[str, ...], output: str, force: bool, target_tokens_per_s: float | None, hardware: str,
           gpus: str, placements: str, plan_placements: str, redundant_experts: str, max_step_ms: float | None,
           fit_fraction: float, capacity_factor: float | None, hbm_reserve: float, context_tokens: int,
           tokens_per_gpu: str | None, gpu_hour_cost: str | None, rebalance_placement: str | None, segments: int, rebalance_every: str | None, window: int | None,
           tokens_per_step: int, phase: str, gpus_per_node: int, quiet: bool, as_json: bool,
           load_file: str | None = None, load_model: str | None = None, load_tokens: int = 200_000) -> None:
    """Write a capacity-planning report on TRACE (or --load-file): recommendation, placements, rebalance windows,
    routing analysis.

    The HTML file is self-contained (no network needed to view it). Nothing is overwritten without --force, and the
    report appears under its name only once it is complete.
    """
    from pathlib import Path

    from simulator.report.build import build_report
    from simulator.report.collect import ReportOptions, collect_inputs
    from simulator.report.render import check_output, write_report

    out = Path(output)
    check_output(out, force)  # fail before the long passes, not after
    if tokens_per_gpu is not None and tokens_per_step:
        raise InputError("--tokens-per-step and --tokens-per-gpu are mutually exclusive: give absolute step sizes "
                         "or per-GPU batches, not both")
    gpu_specs = parse_hardware_list(hardware)
    if gpu_hour_cost is not None:
        gpu_specs = apply_prices(gpu_specs, parse_gpu_hour_cost(gpu_hour_cost))
    options = ReportOptions(
        hardware=gpu_specs,
        plan_tokens_per_gpu=None if tokens_per_gpu is None else _int_list(tokens_per_gpu, "--tokens-per-gpu"), gpus=_int_list(gpus, "--gpus"), gpus_per_node=gpus_per_node,
        placements=tuple(_names(placements)), plan_placements=tuple(_names(plan_placements)),
        redundant_experts=_int_list(redundant_experts, "--redundant-experts"), tokens_per_step=tokens_per_step,
        phase=phase, fit_fraction=fit_fraction, capacity_factor=capacity_factor, hbm_reserve=hbm_reserve,
        context_tokens=context_tokens, target_tokens_per_s=target_tokens_per_s, max_step_ms=max_step_ms,
        rebalance_every=_every(rebalance_every), window=window, rebalance_policy=rebalance_placement,
        segments=segments,
    )
    if target_tokens_per_s is not None and target_tokens_per_s <= 0:
        raise InputError(f"--target-tokens-per-s must be positive, got {target_tokens_per_s}")
    settings = {"command line": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]])}
    from simulator.interop.loadplan import trace_or_load_file

    with trace_or_load_file(trace, load_file, model=load_model, tokens=load_tokens) as (paths, load_note), \
            open_trace(paths) as tr, _bars(quiet or as_json) as bars:
        if load_note:
            settings["load file"] = load_note
        inputs = collect_inputs(tr, options, progress=bars, settings=settings)
    result = build_report(inputs)
    written = write_report(result, out, force=force)
    if as_json:
        json.dump(result.data, sys.stdout, default=_json_default)
        sys.stdout.write("\n")
        return
    err = Console(stderr=True)
    rec = inputs.plan.recommendation if inputs.plan is not None else None
    if rec is not None:
        err.print(f"Recommendation: [bold]{rec.describe()}[/bold], {rec.tokens_per_s:,.0f} tokens/s")
    elif inputs.plan is not None:
        err.print("No layout in the sweep meets the target; see the report's frontier.")
    extra = f" (+ {len(written) - 1} plot files)" if len(written) > 1 else ""
    err.print(f"Report written to [bold]{written[0]}[/bold]{extra}: {len(result.sections)} sections, "
              f"{len(result.figures)} plots.")


def _json_default(value: Any) -> Any:
    import numpy as np

    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, np.generic):
        return value.item()
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")
