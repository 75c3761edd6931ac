"""`moe-sim place`: fit one placement to a trace or a load file, write it as a `file:` placement and,
optionally, in the form an engine loads (export.py).

Shape legend: L MoE layers, E experts, G GPUs, S slots per GPU.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import click
import numpy as np

from simulator.interop.export import TARGETS, export_document, write_export
from simulator.interop.place_explain import explain_policies, render_explain
from simulator.placement import (
    NEEDS_COSELECTION,
    POLICIES,
    Placement,
    RoutingSample,
    expected_gpu_load,
    fit_placement,
    imbalance,
)
from traces.errors import InputError
from traces.loadfile import CANNOT_SHOW, LoadFile, read_load_file
from traces.writer import ARROW_SUFFIXES, HDF5_SUFFIXES, write_text_atomic

EXPORT_SUFFIX = {"sglang": ".sglang.json", "trtllm": ".trtllm.yaml", "eplb": ".eplb.json",
                 "vllm": ".vllm.json"}


@dataclass
class FitSource:
    """What a placement is fitted on: load [L, E] of the MoE layers, co-selection [L, E, E] and the routing
    sample when ids exist."""

    load: np.ndarray
    coselection: np.ndarray | None
    routing: RoutingSample | None
    moe_layers: list[int]
    num_hidden_layers: int
    model_id: str | None
    kind: str  # "trace" or "load file"


def is_trace_path(path: str) -> bool:
    return Path(path).suffix.lower() in HDF5_SUFFIXES + ARROW_SUFFIXES


def load_source(path: str, *, policy: str, model: str | None = None, all_policies: bool = False) -> FitSource:
    """Counts from a trace (read in chunks) or a load file; coactivation needs a trace's co-selection, which
    is also counted when `all_policies` are to be fitted (--explain)."""
    if is_trace_path(path):
        from simulator.replay import fit_statistics
        from traces.reader import open_trace

        with open_trace(path) as trace:
            stats = fit_statistics(trace, fit_fraction=0.0, phase="all", tokens_per_step=0,
                                   with_coselection=policy in NEEDS_COSELECTION or all_policies)
            meta = trace.metadata
        return FitSource(stats.load.astype(np.float64), stats.coselection, stats.routing,
                         list(meta.moe_layers),
                         meta.num_hidden_layers, meta.model_id, "trace")
    lf = read_load_file(path)
    if policy in NEEDS_COSELECTION:
        raise InputError(f"{path}: --policy {policy} needs co-selection, which a load file cannot show "
                         "(it needs per-token expert ids); use a trace or another policy")
    layers, hidden, model_id = lf.layers, lf.num_hidden_layers, lf.model_id
    load = lf.load
    if model is not None:
        layers, load, hidden, model_id = model_rows(lf, model, path)
    return FitSource(load, None, None, layers, hidden, model_id, "load file")


def model_rows(lf: LoadFile, model: str, source: str) -> tuple[list[int], np.ndarray, int, str]:
    """(MoE layers, load [L, E], decoder layers, model id) of a preset, taken from a load file that covers
    it."""
    from traces.presets import get_preset

    preset = get_preset(model)
    if preset.num_experts != lf.num_experts:
        raise InputError(f"{source}: the load file counts {lf.num_experts} experts, {preset.name} has "
                         f"{preset.num_experts}")
    return preset.moe_layers, lf.rows_for(preset.moe_layers,
                                          source), preset.num_hidden_layers, preset.model_id


def placement_document(placement: Placement, src: FitSource, source: str, redundant: int) -> dict[str, Any]:
    """The `file:` placement JSON (simulator.placement.load_placement_file reads it) with how it was made."""
    return {**placement.to_dict(), "model_id": src.model_id, "moe_layers": src.moe_layers,
            "num_hidden_layers": src.num_hidden_layers, "redundant_experts": redundant,
            "fitted_on": {"source": source, "kind": src.kind}}


@click.command()
@click.argument("source", metavar="TRACE|LOADFILE")
@click.option("--gpus", type=click.IntRange(min=1), required=True, help="Expert-parallel GPUs (ranks).")
@click.option("--gpus-per-node", type=click.IntRange(min=1), default=8, show_default=True,
              help="GPUs per node.")
@click.option("--policy", type=click.Choice(list(POLICIES)), default="replicated", show_default=True,
              help="Placement policy (docs/simulator.md); coactivation needs a trace.")
@click.option("--redundant-experts", type=click.IntRange(min=0), default=0, show_default=True,
              help="Extra expert replicas in all (replicating policies).")
@click.option("-o", "--output", required=True, type=click.Path(dir_okay=False),
              help="Placement JSON to write (readable as --placements file:PATH).")
@click.option("--export", "target", type=click.Choice(list(TARGETS)), default=None,
              help="Also write the placement in the form this engine loads (docs/import.md).")
@click.option("--export-output", type=click.Path(dir_okay=False), default=None,
              help="Where the export goes [default: OUTPUT with .sglang.json, .trtllm.yaml, .eplb.json or "
                   ".vllm.json].")
@click.option("--model", default=None, help="Model preset whose MoE layers a load file covers (default: the "
                                            "file's own layers).")
@click.option("--force", is_flag=True, help="Overwrite outputs that exist.")
@click.option("--explain", is_flag=True,
              help="Also fit every policy on the same load and GPUs and show each one's gap to the lower "
                   "bound on any placement's imbalance (per layer).")
@click.option("--json", "as_json", is_flag=True, help="Print the summary as JSON.")
def place(source: str, gpus: int, gpus_per_node: int, policy: str, redundant_experts: int, output: str,
          target: str | None, export_output: str | None, model: str | None, force: bool, explain: bool,
          as_json: bool) -> None:
    """Fit one expert placement to TRACE (a trace file) or LOADFILE (per-layer expert counts) and write it.

    From a load file it balances the counted load; it cannot show per-step imbalance, co-selection or
    all-to-all bytes, which need per-token ids. --export writes what SGLang (--init-expert-location),
    TensorRT-LLM (the MoE load balancer YAML), DeepSeek EPLB (phy2log/log2phy/logcnt) or vLLM (the closest
    engine arguments) load.

    Example: moe-sim place trace.h5 --gpus 8 --policy replicated --redundant-experts 8 -o p.json --export
    sglang

    --explain adds a table of every policy's expected imbalance, the lower bound of its layout and the gap.
    """
    src = load_source(source, policy=policy, model=model, all_policies=explain)
    placement = fit_placement(policy, src.load, num_gpus=gpus, gpus_per_node=gpus_per_node,
                              redundant_experts=redundant_experts, coselection=src.coselection,
                              routing=src.routing)
    placement = Placement(policy, placement.slots, placement.num_experts, gpus_per_node, src.model_id)
    out = Path(output)
    exported = None
    doc = None
    if target is not None:  # build the export first: an impossible one stops before anything is written
        doc = export_document(placement.slots, target, num_experts=placement.num_experts,
                              moe_layers=src.moe_layers, num_hidden_layers=src.num_hidden_layers,
                              model_id=src.model_id,
                              redundant_experts=redundant_experts)
        exported = Path(export_output) if export_output else out.with_name(out.stem + EXPORT_SUFFIX[target])
        if exported.exists() and not force:
            raise InputError(f"{exported}: already exists (pass --force to overwrite)")
    write_text_atomic(out, json.dumps(placement_document(placement, src, source, redundant_experts)) + "\n",
                      force=force)
    if doc is not None and target is not None and exported is not None:
        write_export(exported, doc, target, force=True)
    ratio = imbalance(expected_gpu_load(placement, src.load))  # [L] max / mean GPU load
    summary: dict[str, Any] = {
        "placement": str(out), "export": str(exported) if exported else None, "policy": policy,
        "gpus": gpus, "slots_per_gpu": placement.slots_per_gpu, "layers": placement.num_layers,
        "fitted_on": src.kind, "expected_imbalance_mean": float(ratio.mean()),
        "expected_imbalance_worst": float(ratio.max()),
        "cannot_show": CANNOT_SHOW if src.kind == "load file" else None}
    if target == "vllm" and doc is not None:
        summary["vllm_reproduces_placement"] = doc["reproduces_placement"]
    gaps = explain_policies(src.load, src.coselection, src.routing, num_gpus=gpus,
                            gpus_per_node=gpus_per_node,
                            redundant_experts=redundant_experts) if explain else None
    if gaps is not None:
        summary["explain"] = [row.to_dict() for row in gaps]
    if as_json:
        click.echo(json.dumps(summary, indent=2))
        return
    click.echo(f"wrote {out}: {policy} on {gpus} GPUs x {placement.slots_per_gpu} slots, "
               f"{placement.num_layers} layers; expected GPU load max/mean on the fitted {src.kind}: mean "
               f"{ratio.mean():.3f}, worst layer {ratio.max():.3f}")
    if exported is not None:
        click.echo(f"wrote {exported}: {target} placement")
        if target == "vllm" and doc is not None:
            click.echo(f"note: {doc['cannot_load']}; "
                       + ("the strategy written reproduces this placement" if doc["reproduces_placement"]
                          else "the file gives EPLB settings and the map for reference, not this placement"))
    if gaps is not None:
        for line in render_explain(gaps):
            click.echo(line)
    if src.kind == "load file":
        click.echo(f"note: a load file cannot show {CANNOT_SHOW}")
