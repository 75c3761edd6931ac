"""Fidelity of the expert-time model: per-step predicted against measured expert time on a real GPU.

For each model shape, GPU count G and per-GPU batch B, a synthetic trace that calibration never saw (its own
seed) is replayed by the library (`replay`, contiguous placement, steps of B x G tokens, links priced free so
only expert time is left), once with the roofline and once with the profile. Then each step is run for real:
for every layer, every simulated GPU's share (its received assignments) runs alone on the one GPU through the
profile's backend, timed without launch gaps; the slowest GPU counts per layer and layers are summed, as the
model prices it. Reports mean absolute and p95 per-step error per cell, before (roofline) and after (profile).

    python -m bench.bench_fidelity --profile data/profiles/h200-torch-grouped-mm.yaml --write-docs

`--device cpu` runs the same pipeline on the CPU with small shapes (a smoke test of the code, not a fidelity
figure). Whole-model checks (real forward passes against replay + non-expert) are in bench_fidelity_model.py.
"""

from __future__ import annotations

import argparse
import dataclasses
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from bench.common import machine, update_section
from simulator.hardware import GpuSpec, load_hardware
from simulator.placement import Placement
from simulator.replay import ReplayConfig, replay
from traces.reader import open_trace
from traces.synthetic import SynthConfig, synthesize, write_synthetic

DEFAULT_MODELS = "olmoe-1b-7b,mixtral-8x7b,qwen1.5-moe-a2.7b"
FREE_LINKS: dict[str, Any] = {"scale_up_bandwidth": 1e30, "scale_out_bandwidth": 1e30,
                              "scale_up_latency": 0.0, "scale_out_latency": 0.0}


def predicted(trace_path: Path, gpu: GpuSpec, num_gpus: int, batch: int,
              steps: int) -> tuple[np.ndarray, Placement]:
    """Per-step expert seconds [steps] from the library's replay, and the contiguous placement it used."""
    cfg = ReplayConfig(num_gpus=num_gpus, gpus_per_node=num_gpus,
                       hardware=dataclasses.replace(gpu, **FREE_LINKS), placements=("contiguous",),
                       fit_fraction=0.0, tokens_per_step=batch * num_gpus,
                       redundant_experts=0)
    with open_trace([trace_path]) as tr:
        res = replay(tr, cfg)
    return np.asarray(res.placements[0].step_time_series[0][:steps]), res.fitted_placements[0]


def measured(ids: np.ndarray, weights: np.ndarray, placement: Placement, num_gpus: int, batch: int,
             steps: int, backend, timer, device) -> np.ndarray:
    """Per-step seconds: sum over layers of the slowest simulated GPU's local expert work."""
    import torch

    from simulator.calibrate.expert_work import to_device

    layers = ids.shape[1]
    step_tokens = batch * num_gpus
    out = np.zeros(steps)
    states = torch.randn(step_tokens, backend.shape.hidden_size, device=device).to(torch.bfloat16)
    gpu_of = np.full((layers, placement.num_experts), -1)  # the GPU and local slot of each expert, per layer
    local_of = np.zeros((layers, placement.num_experts), dtype=np.int64)
    for layer in range(layers):
        for g in range(num_gpus):
            for k, e in enumerate(placement.slots[layer, g].tolist()):
                if e >= 0 and gpu_of[layer, e] < 0:
                    gpu_of[layer, e], local_of[layer, e] = g, k
    for s in range(steps):
        rows = slice(s * step_tokens, (s + 1) * step_tokens)
        items, where = [], []
        for layer in range(layers):
            e_ids = ids[rows, layer, :].astype(np.int64)
            w = weights[rows, layer, :].astype(np.float32)
            tok = np.broadcast_to(np.arange(e_ids.shape[0])[:, None], e_ids.shape)
            for g in range(num_gpus):
                mine = gpu_of[layer, e_ids] == g
                local = local_of[layer, e_ids[mine]]
                counts = np.bincount(local, minlength=placement.slots_per_gpu)
                # the GPU holds the tokens it received, once each, however many of their experts it serves
                received, tok_local = np.unique(tok[mine], return_inverse=True)
                work = to_device(local, tok_local, w[mine], max(received.size, 1), backend.shape.hidden_size,
                                 device, counts, states)
                items.append(lambda work=work: backend.run(work))
                where.append(layer)
        with torch.inference_mode():
            secs = timer.time(items, repeats=5)
        per_layer = np.zeros(layers)
        np.maximum.at(per_layer, np.asarray(where), secs)
        out[s] = per_layer.sum()
    return out


def errors(pred: np.ndarray, meas: np.ndarray) -> tuple[float, float]:
    rel = np.abs(pred - meas) / meas
    return float(rel.mean()), float(np.percentile(rel, 95))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--profile", default="h200", help="profile YAML or preset whose shipped profile to check")
    ap.add_argument("--models", default=DEFAULT_MODELS)
    ap.add_argument("--gpus", default="1,8")
    ap.add_argument("--batches", default="16,64,256,1024,4096")
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--seed", type=int, default=101, help="synthetic trace seed (calibration never sees it)")
    ap.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    ap.add_argument("--write-docs", action="store_true")
    args = ap.parse_args()

    import torch

    from simulator.calibrate.expert_work import ExpertShape, make_backend
    from simulator.calibrate.timing import make_timer
    from simulator.cost_model import pricing_for

    device = torch.device(args.device)
    timer = make_timer(device)
    profiled = load_hardware(args.profile)
    if profiled.profile is None:
        raise SystemExit(f"{args.profile}: no measured profile to check")
    roofline = dataclasses.replace(profiled, profile=None)
    gpus = [int(g) for g in args.gpus.split(",")]
    batches = [int(b) for b in args.batches.split(",")]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for model in args.models.split(","):
            tokens = args.steps * max(batches) * max(gpus)
            cfg = SynthConfig(model=model, tokens=tokens, seed=args.seed, decode_fraction=0.0,
                              token_ids=False)
            path = write_synthetic(Path(tmp) / f"{model}.h5", cfg, force=True)
            meta, chunk = synthesize(cfg)
            assert chunk.expert_ids is not None and chunk.expert_weights is not None
            shape = ExpertShape(model, meta.hidden_size, meta.expert_intermediate_size,
                                meta.expert_activation)
            source = pricing_for(profiled, meta).source
            backend_name = pricing_for(profiled, meta).profile.backend  # type: ignore[union-attr]
            for g in gpus:
                for b in batches:
                    before, placement = predicted(path, roofline, g, b, args.steps)
                    after, _ = predicted(path, profiled, g, b, args.steps)
                    backend = make_backend(backend_name, shape, placement.slots_per_gpu, device)
                    meas = measured(chunk.expert_ids, chunk.expert_weights, placement, g, b, len(after),
                                    backend, timer, device)
                    eb, pb = errors(before[: len(meas)], meas)
                    ea, pa = errors(after[: len(meas)], meas)
                    rows.append((model, g, b, len(meas), float(meas.mean()) * 1e3, float(after.mean()) * 1e3,
                                 eb, pb, ea, pa, source))
                    print(f"{model} G={g} B={b}: measured {meas.mean() * 1e3:.3f} ms/step, profile {ea:.1%} "
                          f"(p95 {pa:.1%}), roofline {eb:.1%} (p95 {pb:.1%})", flush=True)
                    del backend
    table = ["| model | GPUs | tokens per GPU per step | steps | measured ms/step | predicted ms/step | "
             "roofline mean / p95 error | profile mean / p95 error |",
             "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for m, g, b, n, meas_ms, pred_ms, eb, pb, ea, pa, _ in rows:
        table.append(f"| {m} | {g} | {b} | {n} | {meas_ms:.3f} | {pred_ms:.3f} | {eb:.1%} / {pb:.1%} | "
                     f"{ea:.1%} / {pa:.1%} |")
    ok = sum(1 for r in rows if r[8] <= 0.10 and r[9] <= 0.20)
    md = "\n".join([
        "## Cost model fidelity (expert time per step)", "",
        f"`python -m bench.bench_fidelity --profile {args.profile} --steps {args.steps}` on {machine()}, "
        f"bf16, random weights. Traces: synthetic, seed {args.seed}, which calibration never saw (it times "
        "its own random count vectors); contiguous placement (60 experts on 8 GPUs: 8 slots each, four "
        "empty). Measured: each simulated GPU's share of each layer (its received assignments: sort, gather, "
        "grouped GEMM up, activation, grouped GEMM down, weight, scatter-add) ran alone on the one GPU, "
        "queued behind a sleep kernel, median of 5; the slowest GPU per layer, layers summed. Predicted: "
        "`replay` with links priced free (expert time only), once with the roofline and once priced by "
        f"{rows[0][10] if rows else '-'}. Errors are |predicted - measured| / measured per step; the two ms "
        "columns show the direction. Target per cell: mean <= 10% and p95 <= 20%.", "", *table, "",
        f"Cells within the target with the profile: {ok} of {len(rows)}; with the roofline: "
        f"{sum(1 for r in rows if r[6] <= 0.10 and r[7] <= 0.20)} of {len(rows)}.",
    ])
    print(md)
    if args.write_docs and args.device == "cuda":
        update_section("fidelity", md)


if __name__ == "__main__":
    main()
