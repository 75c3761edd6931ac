"""Replay and rebalance on a loopback Dask cluster against the same run in one process.

    python -m bench.bench_cluster [--tokens 2000000] [--repeats 3] [--workers 2]

The trace is bench_replay's synthetic OLMoE-1B-7B (ids only). `moe-sim replay`'s library call (fit counts,
six placements, 8 GPUs, steps of 4096 tokens) and `moe-sim rebalance`'s (its default intervals) run three
ways: one process on one kernel thread, one process on every core (--workers), and `--cluster local:N`
(N worker processes on this machine, started once before the timed runs; its start-up is timed apart). Runs
alternate between the ways and each figure is a median; every result is checked to be identical to the
single-thread run's.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from bench.bench_replay import SIX, TOKENS_PER_STEP, build_trace
from bench.common import machine, update_section
from simulator import kernels as K
from simulator.cluster import Cluster, open_cluster
from simulator.hardware import GpuSpec
from simulator.rebalance import RebalanceConfig, rebalance_trace
from simulator.replay import ReplayConfig, replay
from traces import Trace, open_trace


def _exact(data: object) -> str:
    return json.dumps(data, sort_keys=True, default=lambda a: np.asarray(a).tolist())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=2_000_000)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--workers", type=int, default=2, help="worker processes of the local cluster")
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args()
    load = os.getloadavg()[0]  # other work on the machine skews every figure; say how much there was
    cores = K.available_cores()
    replay_config = ReplayConfig(num_gpus=8, gpus_per_node=8, hardware=GpuSpec.from_name("h100"),
                                 placements=SIX, redundant_experts=8, tokens_per_step=TOKENS_PER_STEP)
    jobs: dict[str, Callable[[Trace, Cluster | None], str]] = {
        "replay, 6 placements": lambda tr, on: _exact(replay(tr, replay_config, cluster=on).to_dict()),
        "rebalance, default intervals": lambda tr, on: _exact(
            [r.to_dict(series=True) for r in rebalance_trace(tr, RebalanceConfig(), cluster=on)]),
    }
    ways = ["1 process, 1 thread", f"1 process, {cores} threads", f"--cluster local:{args.workers}"]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "olmoe.h5"
        build_trace(path, args.tokens)
        start = time.perf_counter()
        with open_cluster(f"local:{args.workers}") as on, open_trace(path) as tr:
            assert on is not None
            startup = time.perf_counter() - start
            for label, job in jobs.items():
                K.set_workers(1)
                reference = job(tr, None)  # also compiles
                job(tr, on)  # the workers load the compiled kernels
                times: dict[str, list[float]] = {w: [] for w in ways}
                for _ in range(args.repeats):
                    for way in ways:
                        K.set_workers(cores if way == ways[1] else 1)
                        t = time.perf_counter()
                        out = job(tr, on if way == ways[2] else None)
                        times[way].append(time.perf_counter() - t)
                        assert out == reference, f"{label}: {way} differs from one process"
                base = float(np.median(times[ways[0]]))
                for way in ways:
                    sec = float(np.median(times[way]))
                    rows.append(f"| {label} | {way} | {sec:.2f} | {base / sec:.2f}x |")
    K.set_workers(None)
    md = "\n".join([
        "## Sweeps on a loopback Dask cluster (`python -m bench.bench_cluster`)", "",
        f"{args.tokens:,}-token synthetic OLMoE-1B-7B trace read from its file by every worker; replay of "
        f"six placements on 8 GPUs in steps of {TOKENS_PER_STEP} tokens (fit counts and shards on the "
        "workers), and rebalance's default intervals (one task per interval). Medians of "
        f"{args.repeats} alternating runs on {machine()} (load average {load:.1f} at the start); the local "
        f"cluster's {args.workers} worker processes share these cores with the driver, so this measures the "
        "cluster's overhead, not a speed-up a cluster of machines would give. Starting the local cluster "
        f"took {startup:.1f} s (not in the figures). Results identical to one process (checked each run).",
        "",
        "| work | run | seconds | vs 1 thread |",
        "|---|---|---:|---:|", *rows])
    print(md)
    if not args.no_write:
        update_section("cluster", md)


if __name__ == "__main__":
    main()
