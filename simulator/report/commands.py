"""`moe-sim report`: the HTML or Markdown capacity-planning report (its rebalance options are `moe-sim
rebalance`'s)."""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from typing import Any

import click
from rich.console import Console

from simulator.cli_options import int_list, names, progress_bars
from simulator.commands import plan as plan_cmd
from simulator.hardware import parse_hardware_list
from simulator.plan import apply_prices, parse_gpu_hour_cost
from simulator.rebalance.commands import every_option, rebalance_options
from simulator.replay import DEFAULT_PLACEMENTS
from traces.errors import InputError
from traces.reader import open_trace


def _options_from(source: click.Command, *option_names: str) -> Callable[[click.Command], click.Command]:
    """Give a command some of another command's options (same flags, defaults and help), so the two stay in
    step."""
    by_name = {p.name: p for p in source.params}

    def decorate(command: click.Command) -> click.Command:
        command.params.extend(by_name[n] for n in option_names)
        return command

    return decorate


# ---------------------------------------------------------------------------------------------------- report


@_options_from(plan_cmd, "redundant_experts", "max_step_ms", "fit_fraction", "capacity_factor", "hbm_reserve",
               "context_tokens", "tokens_per_gpu", "gpu_hour_cost", "cost_model", "load_file", "load_model",
               "load_tokens", "dispatch")
@click.command("report")
@click.argument("trace", nargs=-1, required=False)
@click.option("-o", "--output", required=True, type=click.Path(dir_okay=False),
              help="Report file: .html (self-contained, plots embedded) or .md (PNG plots in <name>_files/).")
@click.option("--force", is_flag=True, help="Overwrite an existing report (and its _files folder).")
@click.option("--target-tokens-per-s", type=float, default=None,
              help="Whole-model throughput to reach; sweeps the layouts and recommends one (default: no "
                   "sweep, the first --gpus and --hardware are replayed).")
@click.option("--hardware", default="h100", show_default=True,
              help="Comma-separated GPU presets (h100, h200, b200, a100, mi300x) or YAML/JSON files; the "
                   "same default as `moe-sim plan`, so the two recommend the same layout for the same trace "
                   "and target.")
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
@rebalance_options
@click.option("--json", "as_json", is_flag=True, help="Also print the report's numbers as JSON on stdout.")
def report(trace: tuple[str, ...], output: str, force: bool, target_tokens_per_s: float | None, hardware: str,
           gpus: str, placements: str, plan_placements: str, redundant_experts: str,
           max_step_ms: float | None, fit_fraction: float, capacity_factor: float | None, hbm_reserve: float,
           context_tokens: int, dispatch: str,
           tokens_per_gpu: str | None, gpu_hour_cost: str | None, cost_model: str,
           rebalance_placement: str | None, segments: int, rebalance_every: str | None, window: int | None,
           tokens_per_step: int, phase: str,
           gpus_per_node: int, quiet: bool, as_json: bool, load_file: str | None = None,
           load_model: str | None = None, load_tokens: int = 200_000) -> None:
    """Write a capacity-planning report on TRACE (or --load-file): recommendation, placements, rebalance
    windows, routing analysis.

    The HTML file is self-contained (no network needed to view it). Nothing is overwritten without --force,
    and the report appears under its name only once it is complete.
    """
    from pathlib import Path

    from simulator.report.build import build_report
    from simulator.report.collect import ReportOptions, collect_inputs
    from simulator.report.render import check_output, write_report

    out = Path(output)
    check_output(out, force)  # fail before the long passes, not after
    if tokens_per_gpu is not None and tokens_per_step:
        raise InputError("--tokens-per-step and --tokens-per-gpu are mutually exclusive: give absolute step "
                         "sizes or per-GPU batches, not both")
    gpu_specs = parse_hardware_list(hardware, cost_model)
    if gpu_hour_cost is not None:
        gpu_specs = apply_prices(gpu_specs, parse_gpu_hour_cost(gpu_hour_cost))
    options = ReportOptions(
        hardware=gpu_specs,
        plan_tokens_per_gpu=None if tokens_per_gpu is None else int_list(tokens_per_gpu, "--tokens-per-gpu"),
        gpus=int_list(gpus, "--gpus"), gpus_per_node=gpus_per_node,
        placements=tuple(names(placements)), plan_placements=tuple(names(plan_placements)),
        redundant_experts=int_list(redundant_experts, "--redundant-experts"), tokens_per_step=tokens_per_step,
        phase=phase, fit_fraction=fit_fraction, capacity_factor=capacity_factor, hbm_reserve=hbm_reserve,
        context_tokens=context_tokens, target_tokens_per_s=target_tokens_per_s, max_step_ms=max_step_ms,
        rebalance_every=every_option(rebalance_every), window=window, rebalance_policy=rebalance_placement,
        segments=segments, dispatch=dispatch,
    )
    if target_tokens_per_s is not None and target_tokens_per_s <= 0:
        raise InputError(f"--target-tokens-per-s must be positive, got {target_tokens_per_s}")
    settings = {"command line": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]])}
    from simulator.interop.loadplan import trace_or_load_file

    with trace_or_load_file(trace, load_file, model=load_model, tokens=load_tokens) as (paths, load_note), \
            open_trace(paths) as tr, progress_bars(quiet or as_json) as bars:
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
