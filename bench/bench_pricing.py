"""Replay speed with the measured expert model against the roofline, side by side in one run.

    python -m bench.bench_pricing --tokens 2000000 --write-docs

Replays one synthetic OLMoE-1B-7B trace on 8 x H200 (contiguous and balanced in one pass) at several step
sizes, alternating the two cost models, and reports medians and their ratio. Small steps are the worst case:
pricing runs once per step, per layer and per GPU.
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import tempfile
import time
from pathlib import Path

from bench.common import machine, update_section
from simulator.hardware import load_hardware
from simulator.replay import ReplayConfig, replay
from traces.reader import open_trace
from traces.synthetic import SynthConfig, write_synthetic


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=2_000_000)
    ap.add_argument("--steps", default="8,256,4096", help="tokens per step to compare")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--write-docs", action="store_true")
    args = ap.parse_args()
    profiled = load_hardware("h200")
    if profiled.profile is None:
        raise SystemExit("no shipped h200 profile")
    models = {"roofline": dataclasses.replace(profiled, profile=None), "profile": profiled}
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        path = write_synthetic(Path(tmp) / "t.h5",
                               SynthConfig(model="olmoe-1b-7b", tokens=args.tokens, seed=3))
        for tps in (int(s) for s in args.steps.split(",")):
            times: dict[str, list[float]] = {k: [] for k in models}
            for r in range(args.repeats + 1):  # the first round compiles and warms the page cache
                for name, gpu in models.items():
                    cfg = ReplayConfig(num_gpus=8, hardware=gpu, placements=("contiguous", "balanced"),
                                       tokens_per_step=tps)
                    with open_trace([path]) as tr:
                        t0 = time.perf_counter()
                        replay(tr, cfg)
                        if r:
                            times[name].append(time.perf_counter() - t0)
            med = {k: statistics.median(v) for k, v in times.items()}
            rows.append((tps, med["roofline"], med["profile"], med["profile"] / med["roofline"]))
            print(rows[-1], flush=True)
    lines = ["| tokens per step | roofline s | profile s | profile / roofline |", "|---:|---:|---:|---:|"]
    lines += [f"| {t} | {a:.2f} | {b:.2f} | {c:.2f} |" for t, a, b, c in rows]
    md = "\n".join(["## Replay speed with the measured expert model (`python -m bench.bench_pricing`)", "",
                    f"{args.tokens:,}-token synthetic OLMoE-1B-7B trace, 8 x H200, two placements in one "
                    f"pass, medians of {args.repeats} alternating runs on {machine()}.", "", *lines])
    print(md)
    if args.write_docs:
        update_section("pricing", md)


if __name__ == "__main__":
    main()
