"""Replay on several cores: the same placements replayed with 1 worker and with every core, side by side.

    python -m bench.bench_workers [--tokens 2000000] [--repeats 3]

The trace is bench_replay's synthetic OLMoE-1B-7B (ids only), replayed from the file by run_variants: one
placement and six at once, 8 GPUs, steps of 4096 tokens. Shards of the trace (replay.segment.SHARD_TOKENS) run
on the worker threads. Runs alternate between the worker counts and each figure is a median; the results of
every run are checked to be identical.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import numpy as np

from bench.bench_replay import SIX, TOKENS_PER_STEP, build_trace
from bench.common import machine, update_section
from simulator import kernels as K
from simulator.hardware import GpuSpec
from simulator.replay import fit_statistics, fit_variants, run_variants
from traces import open_trace


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=2_000_000)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args()
    load = os.getloadavg()[0]  # other work on the machine skews every figure; say how much there was
    cores = K.available_cores()
    gpu = GpuSpec.from_name("h100")
    counts = sorted({1, cores} | {2**k for k in range(1, 5) if 2**k < cores})  # scaling, not only the ends
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "olmoe.h5"
        build_trace(path, args.tokens)
        with open_trace(path) as tr:
            meta = tr.metadata
            stats = fit_statistics(tr, fit_fraction=0.0, phase="all", tokens_per_step=TOKENS_PER_STEP,
                                   with_coselection=True)
            six = fit_variants(stats, meta, policies=SIX, num_gpus=8, gpus_per_node=8, redundant_experts=8,
                               tokens_per_step=TOKENS_PER_STEP)
            for label, variants in (("1 placement", [v for v in six if v.placement.policy == "balanced"]),
                                    ("6 placements", six)):
                def run(variants=variants) -> np.ndarray:
                    seg = run_variants(tr, variants, [gpu], phase="all", score_start=0, capacity_factor=None)
                    return np.concatenate([seg.tot_int.ravel().astype(np.float64), seg.comp.ravel()])

                times: dict[int, list[float]] = {n: [] for n in counts}
                K.set_workers(1)
                reference = run()  # also compiles
                for _ in range(args.repeats):
                    for n in counts:
                        K.set_workers(n)
                        t = time.perf_counter()
                        out = run()
                        times[n].append(time.perf_counter() - t)
                        assert np.array_equal(out, reference), "results differ between worker counts"
                assignments = args.tokens * meta.num_moe_layers * meta.top_k * len(variants)
                base = float(np.median(times[1]))
                for n in counts:
                    sec = float(np.median(times[n]))
                    rows.append(f"| {label} | {n} | {sec:.2f} | {assignments / sec / 1e6:,.0f}M | "
                                f"{assignments / len(variants) / sec / n / 1e6:,.0f}M | {base / sec:.2f}x | "
                                f"{base / sec / n:.2f} |")
    K.set_workers(None)
    md = "\n".join([
        f"## Replay on several cores: {cores} cores (`python -m bench.bench_workers`)", "",
        f"{args.tokens:,}-token synthetic OLMoE-1B-7B trace streamed from its file, 8 GPUs, steps of "
        f"{TOKENS_PER_STEP} tokens, medians of {args.repeats} alternating runs on {machine()} (load average "
        f"{load:.1f} at the start). Results identical "
        "for every worker count (checked each run).", "",
        "| placements | workers | seconds | assignments/s | per placement per core | speed-up | efficiency |",
        "|---|---:|---:|---:|---:|---:|---:|", *rows])
    print(md)
    if not args.no_write:  # one section per core count, so the 2-core and 16-core figures sit side by side
        update_section("workers" if cores <= 2 else f"workers-{cores}", md)


if __name__ == "__main__":
    main()
