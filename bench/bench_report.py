"""Routing analysis and rebalance replay on a synthetic OLMoE trace, and the report's build time.

    python -m bench.bench_report [--tokens 1000000]

Routing analysis: tokens/s of the Numba kernels against the plain NumPy reference (routing_analysis.py's
layer_expert_counts / coselection_counts / shared_experts) on the same chunks, in this run. Rebalance:
tokens/s of the replay of five refit intervals at once (10 to 10000 steps). Peak memory of each pass
(tracemalloc). Writes the `report` section of docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import tempfile
import time
import tracemalloc
from collections.abc import Callable
from pathlib import Path

from bench.common import machine, median_time, update_section
from simulator.rebalance import RebalanceConfig, count_steps, default_window, rebalance_trace
from simulator.routing_analysis import (
    analyze_routing,
    coselection_counts,
    layer_expert_counts,
    shared_experts,
)
from traces import open_trace
from traces.synthetic import SynthConfig, write_synthetic


def peak_traced(fn: Callable[[], object]) -> tuple[float, float]:
    """(seconds, peak bytes allocated by Python and NumPy during the call), by tracemalloc."""
    tracemalloc.start()
    start = time.perf_counter()
    fn()
    seconds = time.perf_counter() - start
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    return seconds, float(peak)


def numpy_reference_pass(path: Path) -> None:
    """The same counts as analyze_routing, with the plain NumPy functions (consecutive pairs within a chunk
    only)."""
    with open_trace(path) as trace:
        E = trace.metadata.num_experts
        for chunk in trace.iter_chunks(("expert_ids", "phase", "seq_id", "position")):
            ids = chunk.expert_ids
            assert ids is not None and chunk.phase is not None
            for p in (0, 1):
                layer_expert_counts(ids[chunk.phase == p], E)
            coselection_counts(ids, E)
            shared_experts(ids[:-1], ids[1:])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--tokens", type=int, default=1_000_000)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "bench.h5"
        write_synthetic(path, SynthConfig(tokens=args.tokens, seed=0))
        with open_trace(path) as trace:
            analyze_routing(trace, chunk_tokens=4096)  # compile the kernels
            t_kernel = median_time(lambda: analyze_routing(trace), repeats=3, warmup=0)
            _, mem_routing = peak_traced(lambda: analyze_routing(trace))
            steps = count_steps(trace)
            window = default_window(steps)
            config = RebalanceConfig(every=(10, 100, 1000, 3000, 10000), window=window)
            rebalance_trace(trace, RebalanceConfig(every=(10,), window=window), chunk_tokens=4096)  # warm up
            t_rebalance = median_time(lambda: rebalance_trace(trace, config), repeats=1, warmup=0)
            _, mem_rebalance = peak_traced(lambda: rebalance_trace(trace, config))
        t_numpy = median_time(lambda: numpy_reference_pass(path), repeats=1, warmup=0)
    n = args.tokens
    lines = [
        f"Synthetic OLMoE-1B-7B trace, {n:,} tokens ({steps:,} recorded steps); {machine()}.",
        "",
        "| pass | tokens/s | peak memory (NumPy + Python, tracemalloc) |",
        "|---|---:|---:|",
        f"| routing analysis, Numba kernels | {n / t_kernel:,.0f} | {mem_routing / 2**20:.0f} MiB |",
        f"| routing analysis, NumPy reference (same counts) | {n / t_numpy:,.0f} | |",
        f"| rebalance replay, 5 intervals at once, window {window} | {n / t_rebalance:,.0f} | "
        f"{mem_rebalance / 2**20:.0f} MiB |",
        "",
        f"Kernels against the NumPy reference in the same run: {t_numpy / t_kernel:.1f}x.",
    ]
    text = "\n".join(lines)
    print(text)
    update_section("report",
                   "## Report: routing analysis and rebalance (`python -m bench.bench_report`)\n\n" + text)


if __name__ == "__main__":
    main()
