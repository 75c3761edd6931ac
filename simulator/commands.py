"""`moe-sim replay` and `moe-sim plan`: parse options into a config, call the library, print its render_*()
text or JSON. Tables are at the terminal's width, 120 columns when stdout is a pipe or a file and COLUMNS is
not set."""

from __future__ import annotations

import json
import sys

import click

from simulator.cli_options import (
    cluster_option,
    dispatch_option,
    int_list,
    names,
    progress_bar,
    workers_option,
)
from simulator.cluster import open_cluster
from simulator.cost_model import DEFAULT_CONTEXT_TOKENS, DEFAULT_HBM_RESERVE, DEFAULT_TOKENS_PER_GPU
from simulator.hardware import COST_MODELS, load_hardware, parse_hardware_list
from simulator.interop.loadplan import DEFAULT_LOAD_TOKENS, load_file_options, trace_or_load_file
from simulator.placement import Redundancy
from simulator.plan import PlanConfig, apply_prices, parse_gpu_hour_cost
from simulator.plan import plan as run_plan
from simulator.plan.render import render_plan
from simulator.replay import DEFAULT_FIT_FRACTION, DEFAULT_PLACEMENTS, PHASES, ReplayConfig
from simulator.replay import replay as run_replay
from simulator.replay.render import render_replay
from simulator.tables import output_width
from traces.reader import open_trace


@click.command()
@click.argument("trace", nargs=-1, required=True)
@click.option("--gpus", type=int, default=8, show_default=True, help="Number of GPUs serving the experts.")
@click.option("--gpus-per-node", type=int, default=8, show_default=True,
              help="GPUs per node (NVLink domain).")
@click.option("--hardware", default="h100", show_default=True,
              help="GPU preset (h100, h200, b200, a100, mi300x), a profile from `moe-sim calibrate`, or a "
                   "YAML/JSON file with the GpuSpec fields.")
@click.option("--cost-model", type=click.Choice(list(COST_MODELS)), default="profile", show_default=True,
              help="profile: expert time from measured GPU kernels (a preset without its own profile is "
                   "derived from the nearest measured one); roofline: peak figures x efficiencies "
                   "(uncalibrated).")
@click.option("--placements", default=",".join(DEFAULT_PLACEMENTS), show_default=True,
              help="Comma-separated policies to compare: contiguous, round-robin, balanced, replicated, "
                   "replicated-hier, coactivation, affinity, file:PATH.")
@click.option("--redundant-experts", type=int, default=None,
              help="Extra expert slots for replicated / coactivation / affinity (default: one per GPU, "
                   "rounded so that the slots divide over the GPUs).")
@click.option("--tokens-per-step", type=int, default=0, show_default=True,
              help="Regroup scored tokens into steps of this many (0: the recorded forward passes).")
@click.option("--phase", type=click.Choice(list(PHASES)), default="all", show_default=True,
              help="Replay prefill tokens, decode tokens, or both.")
@click.option("--fit-fraction", type=float, default=DEFAULT_FIT_FRACTION, show_default=True,
              help="Fit placements on this leading share of the trace and score on the rest (0: fit and "
                   "score on everything, which flatters fitted policies).")
@click.option("--capacity-factor", type=float, default=None,
              help="Drop assignments over this factor x the even share per expert slot per step (default: "
                   "none).")
@click.option("--hbm-reserve", type=float, default=DEFAULT_HBM_RESERVE, show_default=True,
              help="Share of HBM kept for KV cache and activations.")
@dispatch_option
@click.option("--per-layer", is_flag=True, help="Also print a per-layer breakdown.")
@click.option("--json", "as_json", is_flag=True, help="Print everything as JSON on stdout instead of tables.")
@click.option("--quiet", is_flag=True, help="No progress bar.")
@workers_option
@cluster_option
def replay_cmd(trace: tuple[str, ...], gpus: int, gpus_per_node: int, hardware: str, cost_model: str,
               placements: str,
               redundant_experts: int | None, tokens_per_step: int, phase: str, fit_fraction: float,
               capacity_factor: float | None, hbm_reserve: float, dispatch: str, per_layer: bool,
               as_json: bool, quiet: bool, cluster: str | None) -> None:
    """Replay TRACE (one file, shards or a glob) on --gpus GPUs and compare expert placements.

    Placements are fitted on the first --fit-fraction of the trace and scored on the rest, all in one pass.
    Experts over HBM x (1 - --hbm-reserve) are marked "over".
    """
    config = ReplayConfig(
        num_gpus=gpus, gpus_per_node=gpus_per_node, hardware=load_hardware(hardware, cost_model),
        placements=tuple(names(placements)), redundant_experts=redundant_experts,
        tokens_per_step=tokens_per_step, phase=phase, fit_fraction=fit_fraction,
        capacity_factor=capacity_factor, hbm_reserve=hbm_reserve, dispatch=dispatch,
    )
    with open_trace(list(trace)) as tr, open_cluster(cluster) as on, \
            progress_bar(tr.num_tokens, "replay", quiet or as_json) as progress:
        config, note = config.resolved(tr.metadata.num_experts)  # the default, as replay resolves it
        result = run_replay(tr, config, progress=progress, cluster=on)
    redundancy = Redundancy(config.redundancy, note)
    if as_json:
        json.dump(result.to_dict(), sys.stdout)
        sys.stdout.write("\n")
        if redundancy.note:
            click.echo(f"note: {redundancy.note}", err=True)
        return
    if redundancy.note:
        sys.stdout.write(f"Note: {redundancy.note}.\n")
    sys.stdout.write(render_replay(result, per_layer=per_layer, width=output_width(),
                                   color=sys.stdout.isatty()))


replay_cmd.name = "replay"
replay = replay_cmd  # (cli.py looks the command up as simulator.commands:replay)


@click.command()
@click.argument("trace", nargs=-1, required=False)
@load_file_options
@click.option("--target-tokens-per-s", type=float, required=True, help="Whole-model throughput to reach.")
@click.option("--hardware", default="h100", show_default=True,
              help="Comma-separated GPU presets or YAML/JSON files to compare.")
@click.option("--cost-model", type=click.Choice(list(COST_MODELS)), default="profile", show_default=True,
              help="profile: measured GPU kernels (see `moe-sim replay --help`); roofline: uncalibrated "
                   "peaks.")
@click.option("--gpus", default="8,16,32,64", show_default=True, help="Comma-separated GPU counts.")
@click.option("--gpus-per-node", type=int, default=8, show_default=True, help="GPUs per node.")
@click.option("--placements", default="contiguous,balanced,replicated", show_default=True,
              help="Comma-separated placement policies (see `moe-sim replay --help`).")
@click.option("--redundant-experts", default="0,8,16", show_default=True,
              help="Comma-separated redundant slot counts for replicating policies.")
@click.option("--tokens-per-gpu", default=None, metavar="B[,B...]",
              help="Comma-separated per-GPU batches: a step on G GPUs holds B x G tokens of one phase "
                   "(attention is data-parallel, so each GPU brings its own batch). Default by --phase: "
                   + "; ".join(f"{k} {','.join(map(str, v))}" for k, v in DEFAULT_TOKENS_PER_GPU.items())
                   + " (docs/cost-model.md says why).")
@click.option("--tokens-per-step", default=None, metavar="N[,N...]",
              help="Comma-separated absolute step sizes in tokens, whatever the GPU count (0: the recorded "
                   "forward passes). Not with --tokens-per-gpu.")
@click.option("--max-step-ms", type=float, default=None,
              help="Latency bound on the p95 whole-model step time.")
@click.option("--phase", type=click.Choice(list(PHASES)), default="all", show_default=True,
              help="Plan for prefill tokens, decode tokens, or both.")
@click.option("--fit-fraction", type=float, default=DEFAULT_FIT_FRACTION, show_default=True,
              help="Leading share of the trace placements are fitted on; the rest is scored.")
@click.option("--capacity-factor", type=float, default=None,
              help="Drop assignments over this factor (default: none).")
@click.option("--hbm-reserve", type=float, default=DEFAULT_HBM_RESERVE, show_default=True,
              help="Share of HBM kept for KV cache and activations.")
@click.option("--context-tokens", type=int, default=DEFAULT_CONTEXT_TOKENS, show_default=True,
              help="Attention context assumed when estimating non-expert FLOPs.")
@dispatch_option
@click.option("--gpu-hour-cost", default=None, metavar="GPU=PRICE[,...]",
              help="Price per GPU-hour, e.g. h100=2.5,b200=6 (your prices; none are built in; also "
                   "price_per_gpu_hour in a hardware file). With a price for every GPU type, layouts are "
                   "ranked by cost per hour and cost per million tokens is shown.")
@click.option("--all", "show_all", is_flag=True, help="Print every grid point, not only the frontier.")
@click.option("--json", "as_json", is_flag=True, help="Print everything as JSON on stdout instead of tables.")
@click.option("--quiet", is_flag=True, help="No progress bar.")
@workers_option
@cluster_option
def plan_cmd(trace: tuple[str, ...], target_tokens_per_s: float, hardware: str, cost_model: str, gpus: str,
             gpus_per_node: int,
             placements: str, redundant_experts: str, tokens_per_gpu: str | None, tokens_per_step: str | None,
             max_step_ms: float | None, phase: str, fit_fraction: float, capacity_factor: float | None,
             hbm_reserve: float, context_tokens: int, dispatch: str, gpu_hour_cost: str | None,
             show_all: bool, as_json: bool, quiet: bool, cluster: str | None = None,
             load_file: str | None = None,
             load_model: str | None = None, load_tokens: int = DEFAULT_LOAD_TOKENS) -> None:
    """Sweep hardware x GPUs x placement x redundancy x batch over TRACE in one pass and recommend a layout.

    The recommendation meets the throughput target and the latency bound with its weights in HBM next to the
    reserve, and is the cheapest per hour when every GPU type has a price (--gpu-hour-cost), else the one with
    the fewest GPUs; then the lowest step time. Batches are per GPU by default, so more GPUs mean larger
    steps.
    """
    gpu_specs = parse_hardware_list(hardware, cost_model)
    if gpu_hour_cost is not None:
        gpu_specs = apply_prices(gpu_specs, parse_gpu_hour_cost(gpu_hour_cost))
    config = PlanConfig(
        target_tokens_per_s=target_tokens_per_s, hardware=gpu_specs,
        gpus=int_list(gpus, "--gpus"), gpus_per_node=gpus_per_node, placements=names(placements),
        redundant_experts=int_list(redundant_experts, "--redundant-experts"),
        tokens_per_step=None if tokens_per_step is None else int_list(tokens_per_step, "--tokens-per-step"),
        tokens_per_gpu=None if tokens_per_gpu is None else int_list(tokens_per_gpu, "--tokens-per-gpu"),
        max_step_ms=max_step_ms, phase=phase,
        fit_fraction=fit_fraction, capacity_factor=capacity_factor, hbm_reserve=hbm_reserve,
        context_tokens=context_tokens, dispatch=dispatch,
    )
    with trace_or_load_file(trace, load_file, model=load_model, tokens=load_tokens) as (paths, load_note), \
            open_trace(paths) as tr, open_cluster(cluster) as on, \
            progress_bar(tr.num_tokens, "plan", quiet or as_json) as progress:
        result = run_plan(tr, config, progress=progress, cluster=on)
    if as_json:
        json.dump({**result.to_dict(), **({"load_file_note": load_note} if load_note else {})}, sys.stdout)
        sys.stdout.write("\n")
        return
    sys.stdout.write(render_plan(result, show_all=show_all, width=output_width(), color=sys.stdout.isatty()))
    if load_note:
        sys.stdout.write(f"note: {load_note}\n")


plan_cmd.name = "plan"
plan = plan_cmd  # (cli.py looks the command up as simulator.commands:plan)
