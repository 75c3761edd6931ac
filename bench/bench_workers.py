"""Replay on several cores: the same placements replayed with 1 worker and with every core, side by side.

    python -m bench.bench_workers [--tokens 2000000] [--repeats 3]

The trace is bench_replay's synthetic OLMoE-1B-7B (ids only), read into memory once so that only the kernel is
timed. Six placements x 8 GPUs, steps of 4096 tokens; the kernel runs its placements in parallel (one thread
each), so the speed-up is bounded by the number of placements as well as the cores. Runs alternate between the
worker counts and each figure is a median; the results of every run are checked to be identical.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numba
import numpy as np

from bench.bench_replay import SIX, TOKENS_PER_STEP, build_trace
from bench.common import machine, update_section
from simulator import kernels as K
from simulator.cost_model import cost_matrix, model_vector
from simulator.hardware import GpuSpec
from simulator.replay import Segment, VariantArrays, fit_statistics, fit_variants
from traces import open_trace


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=2_000_000)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args()
    cores = int(numba.config.NUMBA_NUM_THREADS)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "olmoe.h5"
        build_trace(path, args.tokens)
        with open_trace(path) as tr:
            meta = tr.metadata
            stats = fit_statistics(tr, fit_fraction=0.0, phase="all", tokens_per_step=TOKENS_PER_STEP,
                                   with_coselection=True)
            six = fit_variants(stats, meta, policies=SIX, num_gpus=8, gpus_per_node=8, redundant_experts=8,
                               tokens_per_step=TOKENS_PER_STEP)
            data = next(iter(tr.iter_chunks(("expert_ids", "step", "phase"), args.tokens)))
    assert data.expert_ids is not None and data.step is not None and data.phase is not None
    ids, steps, phases = data.expert_ids, data.step, data.phase
    model, cost = model_vector(meta, None), cost_matrix([GpuSpec.from_name("h100")])

    def run() -> np.ndarray:
        seg = Segment.empty(VariantArrays.build(six, meta.num_experts), model, cost, meta.num_moe_layers)
        for s in range(0, ids.shape[0], 1 << 16):
            e = min(ids.shape[0], s + (1 << 16))
            seg.feed(ids[s:e], steps[s:e], phases[s:e], s, -1, 0)
        seg.finish()
        return np.concatenate([seg.tot_int.ravel().astype(np.float64), seg.comp.ravel()])

    counts = sorted({1, cores})
    times: dict[int, list[float]] = {n: [] for n in counts}
    results: dict[int, np.ndarray] = {}
    for n in counts:  # compile and warm once per thread count
        K.set_workers(n)
        results[n] = run()
    for _ in range(args.repeats):
        for n in counts:
            K.set_workers(n)
            t = time.perf_counter()
            out = run()
            times[n].append(time.perf_counter() - t)
            assert np.array_equal(out, results[1]), "results differ between worker counts"
    K.set_workers(None)
    assignments = ids.shape[0] * meta.num_moe_layers * meta.top_k * len(SIX)
    base = float(np.median(times[1]))
    lines = ["| workers | seconds (median) | assignments/s, all placements | per placement | speed-up | efficiency |",
             "|---:|---:|---:|---:|---:|---:|"]
    for n in counts:
        sec = float(np.median(times[n]))
        lines.append(f"| {n} | {sec:.2f} | {assignments / sec / 1e6:,.0f}M | {assignments / len(SIX) / sec / 1e6:,.0f}M "
                     f"| {base / sec:.2f}x | {base / sec / n:.2f} |")
    md = "\n".join([
        "## Replay on several cores (`python -m bench.bench_workers`)", "",
        f"{args.tokens:,}-token synthetic OLMoE-1B-7B trace in memory, {len(SIX)} placements x 8 GPUs, steps of "
        f"{TOKENS_PER_STEP} tokens, medians of {args.repeats} alternating runs on {machine()}. Results identical "
        "for every worker count (checked each run).", "", *lines, "",
        "The kernel runs placements (and the grid points of `plan`) in parallel, one thread each; a single "
        "placement still runs on one core."])
    print(md)
    if not args.no_write:
        update_section("workers", md)


if __name__ == "__main__":
    main()
