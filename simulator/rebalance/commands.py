"""`moe-sim rebalance`: parse options into a RebalanceConfig, replay it, print the table and the advice (or
JSON)."""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from typing import Any

import click

from simulator.cli_options import cluster_option, int_list, progress_bars, workers_option
from simulator.cluster import open_cluster
from simulator.hardware import load_hardware
from simulator.options import PHASES
from simulator.rebalance.config import RebalanceConfig, passes_needed, rebalance_trace
from simulator.rebalance.render import render_rebalance
from simulator.rebalance.result import DEFAULT_MARGIN, advise
from simulator.tables import DEFAULT_WIDTH, output_width
from traces.reader import open_trace


def every_option(text: str | None) -> tuple[int, ...]:
    """--rebalance-every W[,W...] -> (W, ...); () when not given (the library's default spread)."""
    return tuple(int_list(text, "--rebalance-every")) if text else ()


def rebalance_options(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Options shared by `moe-sim rebalance` and `moe-sim report`: the schedule and the layout it is fitted
    for."""
    options = [
        click.option("--rebalance-every", "rebalance_every", default=None, metavar="W[,W...]",
                     help="Refit the placement every W steps (comma-separated to compare several; default: a "
                          "spread from 1 step to the trace's length)."),
        click.option("--window", type=int, default=None, metavar="N",
                     help="Each refit uses the load of the last N steps (default: an eighth of the steps, at "
                          "most 1000). The first N steps are only fitted on, never scored."),
        click.option("--tokens-per-step", type=int, default=0, show_default=True,
                     help="Regroup tokens into steps of this many (0: the recorded forward passes)."),
        click.option("--phase", type=click.Choice(list(PHASES)), default="all", show_default=True,
                     help="Use prefill tokens, decode tokens, or both."),
        click.option("--gpus-per-node", type=int, default=8, show_default=True, help="GPUs per node."),
        click.option("--quiet", is_flag=True, help="No progress bar."),
        workers_option,
    ]
    for option in reversed(options):
        fn = option(fn)
    return fn


@click.command("rebalance")
@click.argument("trace", nargs=-1, required=True)
@rebalance_options
@click.option("--gpus", type=int, default=8, show_default=True, help="Number of GPUs serving the experts.")
@click.option("--placement", "policy", default="balanced", show_default=True,
              help="Policy refitted at each rebalance: balanced, replicated, replicated-hier, contiguous, "
                   "round-robin.")
@click.option("--redundant-experts", type=int, default=0, show_default=True,
              help="Extra expert slots for the replicated policies.")
@click.option("--hardware", default="h100", show_default=True,
              help="GPU preset or YAML/JSON file whose scale-up bandwidth prices the weight moves.")
@click.option("--margin", type=float, default=DEFAULT_MARGIN, show_default=True,
              help="Recommend refitting only when it lowers the step imbalance, moves included, by this "
                   "fraction against the fixed placement.")
@click.option("--json", "as_json", is_flag=True,
              help="Print the results as JSON on stdout instead of a table.")
@click.option("--series", is_flag=True, help="With --json, include every scored step's imbalance.")
@cluster_option
def rebalance(trace: tuple[str, ...], rebalance_every: str | None, window: int | None, tokens_per_step: int,
              phase: str, gpus_per_node: int, quiet: bool, gpus: int, policy: str, redundant_experts: int,
              hardware: str, margin: float, as_json: bool, series: bool, cluster: str | None) -> None:
    """Replay periodic rebalancing over TRACE: refit the placement every W steps from the last N steps' load.

    Each interval is scored on the steps that follow the refit, against a placement fitted once on the first
    window (fixed) and one fitted on the scored steps themselves (oracle). The weights each refit moves are
    priced at --hardware's scale-up bandwidth; refitting is recommended only when it beats the fixed placement
    by --margin with the moves counted, otherwise the advice is to keep the fixed placement.
    """
    config = RebalanceConfig(
        every=every_option(rebalance_every), window=window, policy=policy, num_gpus=gpus,
        gpus_per_node=gpus_per_node, redundant_experts=redundant_experts,
        phase=None if phase == "all" else phase, tokens_per_step=tokens_per_step or None,
        hardware=load_hardware(hardware), margin=margin,
    )
    with open_trace(list(trace)) as tr:
        config.fit_function(tr.metadata.num_experts)  # a layout the policy cannot fill fails before the bar
        config = config.resolve(tr)
        passes = passes_needed(config.every, tr.metadata.num_moe_layers, tr.metadata.num_experts)
        with open_cluster(cluster) as on, progress_bars(quiet or as_json) as bars:
            results = rebalance_trace(tr, config, progress=bars("rebalance", tr.num_tokens * passes),
                                      cluster=on)
    advice = advise(results, config.margin)
    if as_json:
        json.dump({"trace": [str(p) for p in tr.paths], "results": [r.to_dict(series) for r in results],
                   "advice": advice.to_dict()}, sys.stdout)
        sys.stdout.write("\n")
        return
    width = max(DEFAULT_WIDTH, output_width())  # nine columns and a legend: never squeezed under 120
    sys.stdout.write(render_rebalance(results, advice, width=width, color=sys.stdout.isatty()))
