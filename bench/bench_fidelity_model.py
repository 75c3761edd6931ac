"""Whole-model fidelity: the predicted forward time of the built-in `olmoe-1b-7b-random` against its real
forward passes on one GPU, at prefill 16 x 512 and decode 256 x 1 (over a 512-token cache).

Measured: median of CUDA-event-timed forward passes (warm-up first), no hooks attached, both as the host runs
them (wall) and queued behind a sleep kernel (GPU time without launch gaps, as calibration times kernels);
decode steps append to the cache, so the 10 timed and warm-up steps see 512 to 521 cached tokens. Predicted:
the routing of the same inputs recorded by MoEProfiler, replayed on one GPU with the profile (expert time per
recorded step), plus the profile's non-expert time for that step (prefill or decode table, context = the
tokens attended).

    python -m bench.bench_fidelity_model --profile data/profiles/h200-transformers.yaml --write-docs
"""

from __future__ import annotations

import argparse
import dataclasses
import tempfile
from pathlib import Path

import numpy as np
import torch

from bench.bench_fidelity import FREE_LINKS
from bench.common import machine, update_section
from recorder import MoEProfiler
from recorder.builtin_models import build_builtin_model
from simulator.cost_model import non_expert_work, pricing_for
from simulator.hardware import load_hardware
from simulator.profiles import PROFILES_DIR
from simulator.replay import ReplayConfig, replay
from traces.reader import open_trace


def time_forward(fn, device: torch.device, repeats: int = 7, warmup: int = 3) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        else:
            import time

            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
    return float(np.median(times))


def time_gpu(fn, device: torch.device) -> float:
    """GPU time of fn, queued behind a sleep kernel so the host's launch gaps are hidden (calibration's
    timer); if the forward waits on the GPU inside, this reads the same as the wall time."""
    from simulator.calibrate.timing import make_timer

    return float(make_timer(device).time([fn], repeats=7, warmup=3)[0])


def predict(model, inputs: dict, gpu, context: int, prefill: bool, tmp: Path,
            name: str) -> tuple[float, str, str]:
    """Predicted seconds of one forward pass with these inputs (recorded once, replayed on one GPU)."""
    prof = MoEProfiler(model)
    with prof:
        model(**inputs)
    path = prof.save(tmp / f"{name}.h5", force=True)
    prof.remove()
    with open_trace([path]) as tr:
        meta = tr.metadata
        cfg = ReplayConfig(num_gpus=1, gpus_per_node=1, hardware=dataclasses.replace(gpu, **FREE_LINKS),
                           placements=("contiguous",), fit_fraction=0.0, tokens_per_step=0)
        res = replay(tr, cfg)
    moe = float(np.sum(res.placements[0].step_time_series[0]))
    tokens = res.placements[0].tokens
    ne = non_expert_work(meta, context).step_seconds_array(gpu, np.array([tokens], dtype=np.float64),
                                                           prefill)[0]
    p = pricing_for(gpu, meta)
    return moe + float(ne), p.source, p.non_expert_source


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--profile", default=str(PROFILES_DIR / "h200-transformers.yaml"),
                    help="the transformers-experts profile: the kernels these forward passes run")
    ap.add_argument("--model", default="olmoe-1b-7b-random")
    ap.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    ap.add_argument("--prefill", default="16x512")
    ap.add_argument("--decode", default="256x1")
    ap.add_argument("--cache", type=int, default=512,
                    help="cached tokens per sequence before the decode step")
    ap.add_argument("--write-docs", action="store_true")
    args = ap.parse_args()
    device = torch.device(args.device)
    gpu = load_hardware(args.profile)
    model = build_builtin_model(args.model, device, torch.bfloat16)
    vocab = model.config.vocab_size
    gen = torch.Generator(device="cpu").manual_seed(5)
    rows = []
    with torch.inference_mode(), tempfile.TemporaryDirectory() as tmp:
        b, s = (int(v) for v in args.prefill.split("x"))
        ids = torch.randint(0, vocab, (b, s), generator=gen).to(device)
        meas = time_forward(lambda: model(input_ids=ids, use_cache=False), device)
        queued = time_gpu(lambda: model(input_ids=ids, use_cache=False), device)
        pred, src, ne_src = predict(model, {"input_ids": ids, "use_cache": False}, gpu, s // 2, True,
                                    Path(tmp), "prefill")
        rows.append(("prefill", args.prefill, meas, queued, pred))
        b, s = (int(v) for v in args.decode.split("x"))
        ctx = torch.randint(0, vocab, (b, args.cache), generator=gen).to(device)
        cache = model(input_ids=ctx, use_cache=True).past_key_values
        step = torch.randint(0, vocab, (b, s), generator=gen).to(device)

        def decode() -> None:  # the cache grows by one token a call: 10 calls on 512 tokens change little
            model(input_ids=step, past_key_values=cache, use_cache=True)

        meas = time_forward(decode, device)
        queued = time_gpu(decode, device)
        pred, _, _ = predict(model, {"input_ids": step, "past_key_values": cache, "use_cache": True}, gpu,
                             args.cache + s, False, Path(tmp), "decode")
        rows.append(("decode", args.decode, meas, queued, pred))
    lines = ["| pass | batch x tokens | measured ms, wall | measured ms, GPU (queued) | predicted ms | error "
             "vs wall | error vs GPU |", "|---|---|---:|---:|---:|---:|---:|"]
    for phase, shape, meas, queued, pred in rows:
        lines.append(f"| {phase} | {shape} | {meas * 1e3:.2f} | {queued * 1e3:.2f} | {pred * 1e3:.2f} | "
                     f"{(pred - meas) / meas:+.1%} | {(pred - queued) / queued:+.1%} |")
    md = "\n".join([
        "## Whole-model fidelity (`python -m bench.bench_fidelity_model`)", "",
        f"Built-in `{args.model}` (random weights, real shapes, bf16, transformers' default experts "
        f"implementation) on {machine()}; forward passes with no hooks, median of 7 after 3 warm-ups. "
        f"Predicted: replay of the recorded routing (expert time: {src}) plus non-expert time ({ne_src}). "
        f"Decode steps run over a {args.cache}-token cache. GPU (queued) is the forward pass queued behind a "
        "sleep kernel: its GPU work without launch gaps, what a CUDA-graph replay would take. Target: within "
        "15%.", "", *lines, "",
        "Where decode misses, it is the non-expert side: transformers' eager decode step is host-bound (wall "
        "well above GPU time), and its GPU time holds work the non-expert tables do not time yet (rotary "
        "embedding, q/k norms, the growing cache's concatenation, mask building: dozens of small kernels per "
        "layer). Serving engines run decode under CUDA graphs with fused kernels."])
    print(md)
    if args.write_docs and args.device == "cuda":
        update_section("fidelity-model", md)


if __name__ == "__main__":
    main()
