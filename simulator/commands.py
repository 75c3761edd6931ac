"""`moe-sim replay` and `moe-sim plan`: parse options into a config, call the library, render a table or JSON."""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import click
from rich import box
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from rich.table import Table

from simulator import units
from simulator.cost_model import DEFAULT_CONTEXT_TOKENS, DEFAULT_HBM_RESERVE, DEFAULT_TOKENS_PER_GPU
from simulator.hardware import COST_MODELS, load_hardware, parse_hardware_list
from simulator.placement import Redundancy, default_redundant_experts
from simulator.plan import Candidate, PlanConfig, PlanResult, apply_prices, parse_gpu_hour_cost
from simulator.plan import plan as run_plan
from simulator.replay import DEFAULT_FIT_FRACTION, DEFAULT_PLACEMENTS, PHASES, ReplayConfig, ReplayResult
from simulator.replay import replay as run_replay
from traces.errors import InputError
from traces.reader import open_trace


def _int_list(text: str, option: str) -> list[int]:
    try:
        values = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise InputError(f"{option}: expected comma-separated integers, got {text!r}") from None
    if not values:
        raise InputError(f"{option}: give at least one value")
    return values


def _names(text: str) -> list[str]:
    return [x.strip() for x in text.split(",") if x.strip()]


@contextmanager
def _progress(total: int, label: str, quiet: bool) -> Iterator[Callable[[int], None] | None]:
    if quiet:
        yield None
        return
    console = Console(stderr=True)
    columns = (TextColumn(label), BarColumn(), MofNCompleteColumn(), TextColumn("tokens"), TimeRemainingColumn())
    with Progress(*columns, console=console, transient=True) as bar:
        task = bar.add_task(label, total=total)
        yield lambda n: bar.advance(task, n)


def _console() -> Console:
    """The terminal's width; 120 columns when stdout is a pipe or a file and COLUMNS is not set."""
    console = Console()
    if console.is_terminal or os.environ.get("COLUMNS", "").isdigit():
        return console
    return Console(width=120)


def _table(title: str, columns: list[tuple[str, str]], caption: str | None = None) -> Table:
    """A compact table: (header, justify) columns, no outer edge, one space of padding."""
    table = Table(title=title, title_style="bold", caption=caption, caption_justify="left", box=box.SIMPLE_HEAD,
                  show_edge=False, padding=(0, 1))
    for header, justify in columns:
        table.add_column(header, justify=justify, no_wrap=True)  # type: ignore[arg-type]
    return table


def _dropped(count: int, fraction: float) -> str:
    return "0" if count == 0 else f"{units.si(count)} ({units.share(fraction)})"


def replay_table(result: ReplayResult) -> Table:
    """Headline comparison, one row per placement (fits 120 columns); time split in `breakdown_table`."""
    cfg = result.config
    hw = cfg["hardware"]["name"]
    title = (f"{cfg['num_gpus']} x {hw} ({cfg['gpus_per_node']} per node), phase {cfg['phase']}, "
             f"fitted on {result.fit_tokens:,} tokens, scored on {result.placements[0].tokens:,}")
    priced = result.placements[0].timings[0].priced_by
    caption = ("imbalance: max/mean GPU load summed over layers; step p95: 95th percentile of per-step imbalance; "
               "leave: share of assignments sent off the token's GPU / node; MoE time: mean predicted time per "
               "step of the MoE layers; memory: expert weights per GPU (share of HBM)\n"
               f"expert time priced by: {priced.get('expert_time', '-')}; all-to-all: {priced.get('all_to_all', '-')}")
    table = _table(title, [("placement", "left"), ("imbalance", "right"), ("step\np95", "right"),
                           ("leave\nGPU", "right"), ("leave\nnode", "right"), ("all-to-all\n/step", "right"),
                           ("MoE time\n/step", "right"), ("tokens/s\n/GPU", "right"),
                           ("memory/GPU\n(of HBM)", "right"), ("dropped", "right")], caption)
    for s in result.placements:
        t = s.timings[0]
        table.add_row(
            s.label, units.sig(s.imbalance), units.sig(s.step_imbalance["p95"]),
            units.share(s.leave_gpu_share), units.share(s.leave_node_share),
            units.nbytes(s.all_to_all_bytes_per_step), units.seconds(t.step_time["mean"]),
            units.si(t.tokens_per_s_per_gpu),
            f"{units.nbytes(t.expert_memory_bytes)} ({units.share(t.expert_memory_share)})"
            + ("" if t.expert_memory_fits else " [red]over[/red]"),
            _dropped(s.dropped_assignments, s.dropped_share),
        )
    return table


def breakdown_table(result: ReplayResult) -> Table:
    """Mean MoE time per step split into its parts, the step-time percentiles and per-step imbalance spread."""
    hw = result.config["hardware"]["name"]
    table = _table(f"MoE time per step on {hw}: mean split, then percentiles",
                   [("placement", "left"), ("compute", "right"), ("weights", "right"), ("dispatch", "right"),
                    ("combine", "right"), ("p50", "right"), ("p95", "right"), ("p99", "right"),
                    ("step imbalance\np50/p99", "right")])
    for s in result.placements:
        t = s.timings[0]
        b, q = t.breakdown, t.step_time
        table.add_row(s.label, *(units.seconds(b[k]) for k in ("compute", "weights", "dispatch", "combine")),
                      *(units.seconds(q[k]) for k in ("p50", "p95", "p99")),
                      f"{units.sig(s.step_imbalance['p50'])}/{units.sig(s.step_imbalance['p99'])}")
    return table


def per_layer_table(result: ReplayResult) -> Table:
    table = _table("Per layer: imbalance | leave-node share | MoE time per step",
                   [("layer", "right"), *((s.label, "right") for s in result.placements)])
    layers = len(result.placements[0].per_layer)
    for layer in range(layers):
        cells = []
        for s in result.placements:
            row = s.per_layer[layer]
            time = sum(s.timings[0].per_layer[layer].values())
            cells.append(f"{units.sig(row['imbalance'])} | {units.share(row['leave_node_share'])} | "
                         f"{units.seconds(time)}")
        table.add_row(str(layer), *cells)
    return table


@click.command()
@click.argument("trace", nargs=-1, required=True)
@click.option("--gpus", type=int, default=8, show_default=True, help="Number of GPUs serving the experts.")
@click.option("--gpus-per-node", type=int, default=8, show_default=True, help="GPUs per node (NVLink domain).")
@click.option("--hardware", default="h100", show_default=True,
              help="GPU preset (h100, h200, b200, a100, mi300x), a profile from `moe-sim calibrate`, or a YAML/JSON "
                   "file with the GpuSpec fields.")
@click.option("--cost-model", type=click.Choice(list(COST_MODELS)), default="profile", show_default=True,
              help="profile: expert time from measured GPU kernels (a preset without its own profile is derived "
                   "from the nearest measured one); roofline: peak figures x efficiencies (uncalibrated).")
@click.option("--placements", default=",".join(DEFAULT_PLACEMENTS), show_default=True,
              help="Comma-separated policies to compare: contiguous, round-robin, balanced, replicated, "
                   "replicated-hier, coactivation, file:PATH.")
@click.option("--redundant-experts", type=int, default=None,
              help="Extra expert slots for replicated / coactivation (default: one per GPU, rounded so that the "
                   "slots divide over the GPUs).")
@click.option("--tokens-per-step", type=int, default=0, show_default=True,
              help="Regroup scored tokens into steps of this many (0: the recorded forward passes).")
@click.option("--phase", type=click.Choice(list(PHASES)), default="all", show_default=True,
              help="Replay prefill tokens, decode tokens, or both.")
@click.option("--fit-fraction", type=float, default=DEFAULT_FIT_FRACTION, show_default=True,
              help="Fit placements on this leading share of the trace and score on the rest (0: fit and score on "
                   "everything, which flatters fitted policies).")
@click.option("--capacity-factor", type=float, default=None,
              help="Drop assignments over this factor x the even share per expert slot per step (default: none).")
@click.option("--hbm-reserve", type=float, default=DEFAULT_HBM_RESERVE, show_default=True,
              help="Share of HBM kept for KV cache and activations.")
@click.option("--per-layer", is_flag=True, help="Also print a per-layer breakdown.")
@click.option("--json", "as_json", is_flag=True, help="Print everything as JSON on stdout instead of tables.")
@click.option("--quiet", is_flag=True, help="No progress bar.")
def replay_cmd(trace: tuple[str, ...], gpus: int, gpus_per_node: int, hardware: str, cost_model: str,
               placements: str,
               redundant_experts: int | None, tokens_per_step: int, phase: str, fit_fraction: float,
               capacity_factor: float | None, hbm_reserve: float, per_layer: bool, as_json: bool,
               quiet: bool) -> None:
    """Replay TRACE (one file, shards or a glob) on --gpus GPUs and compare expert placements.

    Placements are fitted on the first --fit-fraction of the trace and scored on the rest, all in one pass.
    Experts over HBM x (1 - --hbm-reserve) are marked "over".
    """
    redundancy = Redundancy(redundant_experts) if redundant_experts is not None else None
    if redundancy is None:  # the library's default, from the trace's expert count
        with open_trace(list(trace)) as tr:
            redundancy = default_redundant_experts(tr.metadata.num_experts, gpus)
    config = ReplayConfig(
        num_gpus=gpus, gpus_per_node=gpus_per_node, hardware=load_hardware(hardware, cost_model),
        placements=tuple(_names(placements)),
        redundant_experts=redundancy.redundant_experts,
        tokens_per_step=tokens_per_step, phase=phase, fit_fraction=fit_fraction, capacity_factor=capacity_factor,
        hbm_reserve=hbm_reserve,
    )
    with open_trace(list(trace)) as tr, _progress(tr.num_tokens, "replay", quiet or as_json) as progress:
        result = run_replay(tr, config, progress=progress)
    if as_json:
        json.dump(result.to_dict(), sys.stdout)
        sys.stdout.write("\n")
        if redundancy.note:
            click.echo(f"note: {redundancy.note}", err=True)
        return
    console = _console()
    if redundancy.note:
        console.print(f"Note: {redundancy.note}.")
    console.print(replay_table(result))
    console.print(breakdown_table(result))
    if per_layer:
        console.print(per_layer_table(result))
    best = min(result.placements, key=lambda s: s.timings[0].step_time["mean"])
    console.print(f"Fastest: [bold]{best.label}[/bold] at {units.seconds(best.timings[0].step_time['mean'])} MoE "
                  f"time per step, imbalance {units.sig(best.imbalance)}.")


replay_cmd.name = "replay"
replay = replay_cmd  # (cli.py looks the command up as simulator.commands:replay)


def _batch_cell(c: Candidate) -> str:
    if c.tokens_per_gpu:
        return f"{units.si(c.tokens_per_gpu)} x {c.num_gpus}"
    return "recorded" if c.tokens_per_step == 0 else units.si(c.tokens_per_step)


def plan_table(result: PlanResult, rows: list[Candidate], title: str) -> Table:
    """One row per candidate layout (fits 120 columns); whole-model step times. When priced, cost per hour and per
    million tokens take the place of tokens/s per GPU and imbalance (both stay in --json)."""
    priced = any(c.price_per_hour is not None for c in rows)
    per_gpu = any(c.tokens_per_gpu for c in rows)
    columns = [("GPUs", "left"), ("placement", "left"),
               ("tokens/GPU\nx GPUs" if per_gpu else "tokens\n/step", "right"), ("step\nmean", "right"),
               ("step\np95", "right"), ("tokens/s", "right")]
    columns += [("cost\n/hour", "right"), ("cost /\nM tokens", "right")] if priced else \
        [("tokens/s\n/GPU", "right"), ("imbalance", "right")]
    table = _table(title, columns + [("memory\n/GPU", "right"), ("fits", "right"), ("meets", "right")])
    for c in rows:
        cells = [f"{c.num_gpus} x {c.hardware}", c.placement, _batch_cell(c), units.seconds(c.step_ms / 1e3),
                 units.seconds(c.step_ms_p95 / 1e3), units.si(c.tokens_per_s)]
        if priced:
            cells += [units.sig(c.price_per_hour) if c.price_per_hour is not None else "-",
                      units.sig(c.cost_per_million_tokens) if c.cost_per_million_tokens is not None else "-"]
        else:
            cells += [units.si(c.tokens_per_s_per_gpu), units.sig(c.imbalance)]
        cells += [units.nbytes(c.memory_per_gpu_bytes), "yes" if c.fits_memory else "[red]no[/red]",
                  "[green]yes[/green]" if c.meets_target else "no"]
        table.add_row(*cells)
    return table


@click.command()
@click.argument("trace", nargs=-1, required=True)
@click.option("--target-tokens-per-s", type=float, required=True, help="Whole-model throughput to reach.")
@click.option("--hardware", default="h100", show_default=True,
              help="Comma-separated GPU presets or YAML/JSON files to compare.")
@click.option("--cost-model", type=click.Choice(list(COST_MODELS)), default="profile", show_default=True,
              help="profile: measured GPU kernels (see `moe-sim replay --help`); roofline: uncalibrated peaks.")
@click.option("--gpus", default="8,16,32,64", show_default=True, help="Comma-separated GPU counts.")
@click.option("--gpus-per-node", type=int, default=8, show_default=True, help="GPUs per node.")
@click.option("--placements", default="contiguous,balanced,replicated", show_default=True,
              help="Comma-separated placement policies (see `moe-sim replay --help`).")
@click.option("--redundant-experts", default="0,8,16", show_default=True,
              help="Comma-separated redundant slot counts for replicating policies.")
@click.option("--tokens-per-gpu", default=None, metavar="B[,B...]",
              help="Comma-separated per-GPU batches: a step on G GPUs holds B x G tokens of one phase (attention is "
                   "data-parallel, so each GPU brings its own batch). Default by --phase: "
                   + "; ".join(f"{k} {','.join(map(str, v))}" for k, v in DEFAULT_TOKENS_PER_GPU.items())
                   + " (docs/cost-model.md says why).")
@click.option("--tokens-per-step", default=None, metavar="N[,N...]",
              help="Comma-separated absolute step sizes in tokens, whatever the GPU count (0: the recorded forward "
                   "passes). Not with --tokens-per-gpu.")
@click.option("--max-step-ms", type=float, default=None, help="Latency bound on the p95 whole-model step time.")
@click.option("--phase", type=click.Choice(list(PHASES)), default="all", show_default=True,
              help="Plan for prefill tokens, decode tokens, or both.")
@click.option("--fit-fraction", type=float, default=DEFAULT_FIT_FRACTION, show_default=True,
              help="Leading share of the trace placements are fitted on; the rest is scored.")
@click.option("--capacity-factor", type=float, default=None, help="Drop assignments over this factor (default: none).")
@click.option("--hbm-reserve", type=float, default=DEFAULT_HBM_RESERVE, show_default=True,
              help="Share of HBM kept for KV cache and activations.")
@click.option("--context-tokens", type=int, default=DEFAULT_CONTEXT_TOKENS, show_default=True,
              help="Attention context assumed when estimating non-expert FLOPs.")
@click.option("--gpu-hour-cost", default=None, metavar="GPU=PRICE[,...]",
              help="Price per GPU-hour, e.g. h100=2.5,b200=6 (your prices; none are built in; also "
                   "price_per_gpu_hour in a hardware file). With a price for every GPU type, layouts are ranked by "
                   "cost per hour and cost per million tokens is shown.")
@click.option("--all", "show_all", is_flag=True, help="Print every grid point, not only the frontier.")
@click.option("--json", "as_json", is_flag=True, help="Print everything as JSON on stdout instead of tables.")
@click.option("--quiet", is_flag=True, help="No progress bar.")
def plan_cmd(trace: tuple[str, ...], target_tokens_per_s: float, hardware: str, cost_model: str, gpus: str,
             gpus_per_node: int,
             placements: str, redundant_experts: str, tokens_per_gpu: str | None, tokens_per_step: str | None,
             max_step_ms: float | None, phase: str, fit_fraction: float, capacity_factor: float | None,
             hbm_reserve: float, context_tokens: int, gpu_hour_cost: str | None, show_all: bool, as_json: bool,
             quiet: bool) -> None:
    """Sweep hardware x GPUs x placement x redundancy x batch over TRACE in one pass and recommend a layout.

    The recommendation meets the throughput target and the latency bound with its weights in HBM next to the
    reserve, and is the cheapest per hour when every GPU type has a price (--gpu-hour-cost), else the one with the
    fewest GPUs; then the lowest step time. Batches are per GPU by default, so more GPUs mean larger steps.
    """
    gpu_specs = parse_hardware_list(hardware, cost_model)
    if gpu_hour_cost is not None:
        gpu_specs = apply_prices(gpu_specs, parse_gpu_hour_cost(gpu_hour_cost))
    config = PlanConfig(
        target_tokens_per_s=target_tokens_per_s, hardware=gpu_specs,
        gpus=_int_list(gpus, "--gpus"), gpus_per_node=gpus_per_node, placements=_names(placements),
        redundant_experts=_int_list(redundant_experts, "--redundant-experts"),
        tokens_per_step=None if tokens_per_step is None else _int_list(tokens_per_step, "--tokens-per-step"),
        tokens_per_gpu=None if tokens_per_gpu is None else _int_list(tokens_per_gpu, "--tokens-per-gpu"),
        max_step_ms=max_step_ms, phase=phase,
        fit_fraction=fit_fraction, capacity_factor=capacity_factor, hbm_reserve=hbm_reserve,
        context_tokens=context_tokens,
    )
    with open_trace(list(trace)) as tr, _progress(tr.num_tokens, "plan", quiet or as_json) as progress:
        result = run_plan(tr, config, progress=progress)
    if as_json:
        json.dump(result.to_dict(), sys.stdout)
        sys.stdout.write("\n")
        return
    console = _console()
    rows = result.candidates if show_all else list(result.frontier)
    if result.recommendation is not None and result.recommendation not in rows:
        rows.append(result.recommendation)
    title = f"{'All grid points' if show_all else 'Frontier'} ({len(result.candidates)} candidates)"
    console.print(plan_table(result, rows, title))
    if result.skipped:  # one short line: which points, and the first reason (--json has every reason)
        points = [line.split(": ", 1)[0] for line in result.skipped]
        first = result.skipped[0].split(": ", 1)[-1]
        shown = "; ".join(points[:6]) + (f"; and {len(points) - 6} more" if len(points) > 6 else "")
        console.print(f"[dim]skipped {len(points)} grid point(s) that cannot be built or planned: {shown} "
                      f"(first reason: {first}; --json lists every reason)[/dim]")
    for name, priced in result.pricing.items():
        console.print(f"[dim]{name}: expert time {priced['expert_time']}; non-expert {priced['non_expert_time']}; "
                      f"all-to-all {priced['all_to_all']}[/dim]")
    head = "Recommendation" if result.recommendation else "No recommendation"
    console.print(f"[bold]{head}[/bold]")
    for reason in result.reasons:
        console.print(f"  - {reason}")


plan_cmd.name = "plan"
plan = plan_cmd  # (cli.py looks the command up as simulator.commands:plan)
