"""`moe-sim calibrate`: measure this machine's GPU into a cost profile that `--hardware PROFILE.yaml` prices
with."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import click
import numpy as np

from simulator import units
from simulator.profiles import (
    BACKENDS,
    DEFAULT_BACKEND,
    Communication,
    CostProfile,
    load_profile,
    profile_to_dict,
    write_profile,
)
from traces.errors import InputError
from traces.schema import TraceMetadata

DEFAULT_MODELS = "olmoe-1b-7b,mixtral-8x7b,qwen1.5-moe-a2.7b"


def _shapes(models: str | None, trace: str | None) -> tuple[list[tuple[str, TraceMetadata]],
                                                            np.ndarray | None]:
    """The shapes to measure and, from a trace, one layer's routing for the all-to-all's per-pair counts."""
    if trace is not None:
        from traces.reader import open_trace

        with open_trace([trace]) as tr:
            ids = None
            for chunk in tr.iter_chunks(("expert_ids",), 65536):
                assert chunk.expert_ids is not None
                ids = chunk.expert_ids[:, 0, :].astype(np.int64)
                break
            return [(tr.metadata.model_id or Path(trace).stem, tr.metadata)], ids
    from traces.presets import preset_metadata

    names = [m.strip() for m in (models or DEFAULT_MODELS).split(",") if m.strip()]
    if not names:
        raise InputError("--model: give at least one preset")
    return [(n, preset_metadata(n)) for n in names], None


def _communication(metas: list[tuple[str, TraceMetadata]], ids: np.ndarray | None,
                   quick: bool) -> Communication:
    import torch

    gpus = torch.cuda.device_count()
    if gpus < 2:
        return Communication("deepep")
    from simulator.calibrate.comm import calibrate_all_to_all

    meta = metas[0][1]
    if ids is None:  # uniform routing stands in for a trace's
        rng = np.random.default_rng(0)
        ids = np.stack([rng.choice(meta.num_experts, meta.top_k, replace=False) for _ in range(4096)])
    slot_gpu = (np.arange(meta.num_experts) * gpus) // meta.num_experts  # contiguous placement
    out = calibrate_all_to_all(ids, slot_gpu, meta.hidden_size, gpus, repeats=3 if quick else 10)
    return Communication("measured", out["dispatch_bytes_per_s"], out["combine_bytes_per_s"],
                         out["latency_s"], out["points"])


def _summary(profile: CostProfile) -> str:
    lines = [f"Profile of {profile.gpu.get('name', profile.hardware)} ({profile.hardware}), backend "
             f"{profile.backend}{', quick' if profile.quick else ''}:"]
    for s in profile.shapes:
        e = s.expert
        r = e.residuals
        if e.overhead_seconds is not None:
            rest = (f"non-GEMM work {units.seconds(float(e.overhead_seconds[0]))} at 1 assignment to "
                    f"{units.seconds(float(e.overhead_seconds[-1]))} at "
                    f"{2 ** (len(e.overhead_seconds) - 1):,}")
            how = "checked on"
        else:
            rest = (f"fixed {units.seconds(e.fixed_seconds)}, {units.seconds(e.per_assignment_seconds)} per "
                    "assignment")
            how = "fit on"
        lines.append(f"  {s.name} ({s.shape_label}): tile {e.tile_rows} rows, {rest}; {how} "
                     f"{int(r.get('vectors', 0))} skewed count vectors: mean |error| "
                     f"{units.share(r.get('mean_abs', float('nan')))}, p95 "
                     f"{units.share(r.get('p95_abs', float('nan')))}")
    c = profile.communication
    if c.source == "measured":
        assert c.dispatch_bytes_per_s and c.combine_bytes_per_s and c.latency_s is not None
        lines.append(f"  all-to-all (measured): dispatch {units.si(c.dispatch_bytes_per_s, 'B/s')}, combine "
                     f"{units.si(c.combine_bytes_per_s, 'B/s')}, latency {units.seconds(c.latency_s)}")
    else:
        lines.append("  all-to-all: one GPU, so the DeepEP figures stay (153 GB/s dispatch, "
                     "158 GB/s combine)")
    return "\n".join(lines)


@click.command("calibrate")
@click.option("-o", "--output", required=True, type=click.Path(dir_okay=False), help="Profile YAML to write.")
@click.option("--model", "models", default=None,
              help="Comma-separated model presets whose expert shapes to measure [default: "
                   f"{DEFAULT_MODELS}].")
@click.option("--trace", default=None, type=click.Path(),
              help="Measure the shapes of this trace instead of presets.")
@click.option("--backend", type=click.Choice(list(BACKENDS)), default=DEFAULT_BACKEND, show_default=True,
              help="Expert kernel to time: torch's grouped GEMM, transformers' experts module, or vLLM's / "
                   "SGLang's fused MoE where importable.")
@click.option("--hardware", default=None, help="Preset this GPU matches (default: detected from its name).")
@click.option("--device", type=click.Choice(["cuda", "cpu"]), default="cuda", show_default=True,
              help="cpu runs the same pipeline on the CPU, to test it end to end; its times are not a GPU's.")
@click.option("--quick", is_flag=True, help="Thinner grids and fewer repeats: under 2 minutes on an H200.")
@click.option("--force", is_flag=True, help="Overwrite an existing profile.")
@click.option("--json", "as_json", is_flag=True, help="Print the profile as JSON on stdout as well.")
@click.option("--quiet", is_flag=True, help="No progress bar.")
@click.option("--refit", default=None, type=click.Path(),
              help="Fit this profile's stored measurements again under this version's model and write it to "
                   "OUTPUT (no GPU, nothing re-measured).")
def calibrate(output: str, models: str | None, trace: str | None, backend: str, hardware: str | None,
              device: str, quick: bool, force: bool, as_json: bool, quiet: bool, refit: str | None) -> None:
    """Measure this machine's CUDA GPU into a cost profile for `--hardware OUTPUT`.

    Times one GPU's routed-expert work over a grid of experts x rows and over skewed count vectors like real
    steps (sort, gather, both GEMMs, activation, weighting, scatter-add), fits the expert-time model of
    docs/cost-model.md, and times the non-expert layer work by batch and context. With 2+ GPUs it also
    measures the NCCL all-to-all. The profile is written only when every measurement has finished.
    """
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    from simulator.calibrate import run

    out = Path(output)
    if out.exists() and not force:
        raise InputError(f"{out}: exists (use --force to overwrite)")
    if models is not None and trace is not None:
        raise InputError("--model and --trace exclude each other")
    if refit is not None:
        # what is measured, and how, is the stored profile's: a measuring option here would be ignored
        given = [name for name, value in (("--model", models), ("--trace", trace), ("--hardware", hardware),
                                          ("--quick", quick)) if value] \
            + [name for name, value, default in (("--backend", backend, DEFAULT_BACKEND),
                                                 ("--device", device, "cuda")) if value != default]
        if given:
            raise InputError(f"--refit re-fits the stored measurements; it takes no {', '.join(given)}")
        profile = run.refit_profile(load_profile(refit))
    else:
        metas, ids = _shapes(models, trace)
        run.require_device(device)
        if device == "cpu" and hardware is None:
            raise InputError("calibrate --device cpu: name the hardware preset the profile stands for with "
                             "--hardware")
        total = run.work_units(metas, run.Plan(quick))
        console = Console(stderr=True)
        columns = (TextColumn("calibrate"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn())
        with Progress(*columns, console=console, transient=True, disable=quiet or as_json) as bar:
            task = bar.add_task("calibrate", total=total)
            comm = _communication(metas, ids, quick) if device == "cuda" else Communication("deepep")
            profile = run.calibrate(metas, backend=backend, quick=quick, hardware=hardware,
                                    communication=comm, tick=lambda n: bar.advance(task, n), device=device)
    write_profile(profile, out)
    if as_json:
        json.dump(profile_to_dict(profile), sys.stdout)
        sys.stdout.write("\n")
        return
    click.echo(_summary(profile))
    click.echo(f"Wrote {out}; price with it: moe-sim replay TRACE --hardware {out}")
