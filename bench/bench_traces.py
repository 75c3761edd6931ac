"""Trace storage benchmark: write/read throughput per encoding, ids-only reads, bytes per token, streaming
memory.

    python -m bench.bench_traces --tokens 10000000

One pass synthesises an OLMoE-1B-7B trace (16 layers x 64 experts, top-8) chunk by chunk and appends every
chunk to four writers: HDF5 and Arrow, with weights and without (ids-only files give bytes/token without
weights); append time is measured per writer. Reads run in fresh subprocesses (median of --repeats runs after
a warm-up that also fills the page cache), which report their peak RSS. A second, smaller run compares the
compression choices for ids side by side. Figures go to docs/benchmarks.md (section "traces").
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
ENCODINGS = {"hdf5": ".h5", "arrow": ".arrow"}

READER = """
import json, sys, time
sys.path.insert(0, {root!r})
from traces import open_trace
path, fields, repeats = sys.argv[1], sys.argv[2].split(","), int(sys.argv[3])
times = []
for i in range(repeats + 1):  # the first run warms the page cache and imports
    start = time.perf_counter()
    tokens = 0
    with open_trace(path) as trace:
        for chunk in trace.iter_chunks(fields, 1 << 16):
            tokens += chunk.num_tokens
    if i:
        times.append(time.perf_counter() - start)
# VmHWM: this process's peak resident set (ru_maxrss would include the parent's, inherited across exec)
hwm = next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith("VmHWM:"))
print(json.dumps({{"tokens": tokens, "times": times, "peak_rss": hwm * 1024}}))
"""


def write_pass(folder: Path, tokens: int, seed: int) -> dict:
    """Synthesise once, append every chunk to four writers; time generation and each writer's appends."""
    from traces import open_writer
    from traces.synthetic import SynthConfig, iter_synthetic, synth_metadata

    config = SynthConfig(tokens=tokens, seed=seed)
    meta = synth_metadata(config)
    meta.created_at, meta.tool_version = "bench", "bench"
    ids_meta = synth_metadata(config)
    ids_meta.has_weights = False
    writers = {}
    for name, suffix in ENCODINGS.items():
        writers[(name, True)] = open_writer(folder / f"full{suffix}", meta, force=True)
        writers[(name, False)] = open_writer(folder / f"ids{suffix}", ids_meta, force=True)
    append_s = dict.fromkeys(writers, 0.0)
    synth_s = 0.0
    start = time.perf_counter()
    for chunk in iter_synthetic(config):
        synth_s += time.perf_counter() - start
        for key, writer in writers.items():
            t0 = time.perf_counter()
            writer.append(chunk)
            append_s[key] += time.perf_counter() - t0
        start = time.perf_counter()
    for key, writer in writers.items():
        t0 = time.perf_counter()
        writer.close()
        append_s[key] += time.perf_counter() - t0
    return {"synth_s": synth_s, "append_s": append_s}


def read_in_subprocess(path: Path, fields: list[str], repeats: int) -> dict:
    script = READER.format(root=str(ROOT))
    out = subprocess.run([sys.executable, "-c", script, str(path), ",".join(fields), str(repeats)],
                         capture_output=True, text=True, check=True)
    return json.loads(out.stdout)


def compare_compressions(folder: Path, tokens: int, seed: int,
                         repeats: int) -> list[tuple[str, str, float, float]]:
    """(encoding, compression, ids bytes/token, ids-only read tokens/s) for every compression, same chunks."""
    from traces import open_trace, open_writer
    from traces.arrow_format import COMPRESSIONS as ARROW
    from traces.hdf5_format import COMPRESSIONS as HDF5
    from traces.synthetic import SynthConfig, iter_synthetic, synth_metadata

    config = SynthConfig(tokens=tokens, seed=seed)
    meta = synth_metadata(config)
    meta.has_weights = False
    meta.created_at, meta.tool_version = "bench", "bench"
    choices = [("hdf5", c) for c in HDF5] + [("arrow", c) for c in ARROW]
    writers = {c: open_writer(folder / f"cmp-{c[1]}{ENCODINGS[c[0]]}", meta, force=True, compression=c[1])
               for c in choices}
    for chunk in iter_synthetic(config):
        for writer in writers.values():
            writer.append(chunk)
    rows = []
    for choice, writer in writers.items():
        path = writer.close()
        times = []
        for i in range(repeats + 1):
            start = time.perf_counter()
            with open_trace(path) as trace:
                for _ in trace.iter_chunks(["expert_ids"], 1 << 16):
                    pass
            if i:
                times.append(time.perf_counter() - start)
        rows.append((choice[0], choice[1], path.stat().st_size / tokens, tokens / statistics.median(times)))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=10_000_000)
    parser.add_argument("--compare-tokens", type=int, default=1_000_000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--dir", type=Path, default=None, help="Scratch folder (default: a temporary one).")
    parser.add_argument("--no-update", action="store_true",
                        help="Print only; leave docs/benchmarks.md alone.")
    args = parser.parse_args()

    from bench.common import machine, update_section
    from traces.synthetic import SynthConfig, iter_synthetic

    folder = Path(tempfile.mkdtemp(prefix="bench-traces-", dir=args.dir))
    load_before = os.getloadavg()[0]
    try:
        for _ in iter_synthetic(SynthConfig(tokens=1000)):  # compile the kernels outside the timings
            pass
        n = args.tokens
        print(f"writing {n:,} tokens to {folder} ...", flush=True)
        written = write_pass(folder, n, args.seed)
        results = {}
        for name, suffix in ENCODINGS.items():
            full, ids_only = folder / f"full{suffix}", folder / f"ids{suffix}"
            print(f"reading {name} ...", flush=True)
            results[name] = {
                "write": n / written["append_s"][(name, True)],
                "bytes": full.stat().st_size / n,
                "bytes_ids": ids_only.stat().st_size / n,
                "all": read_in_subprocess(full, ["seq_id", "position", "token_id", "phase", "step",
                                                 "expert_ids", "expert_weights"], args.repeats),
                "ids": read_in_subprocess(full, ["expert_ids"], args.repeats),
            }
        print("comparing compressions ...", flush=True)
        compare = compare_compressions(folder, args.compare_tokens, args.seed, args.repeats)
    finally:
        shutil.rmtree(folder, ignore_errors=True)

    synth_rate = n / written["synth_s"]
    load = f"{load_before:.1f} at the start, {os.getloadavg()[0]:.1f} at the end"
    lines = [
        "## Trace storage (`python -m bench.bench_traces`)",
        "",
        f"Machine: {machine()}. Synthetic OLMoE-1B-7B trace (`moe-sim synth` defaults: 16 layers x 64 "
        f"experts, top-8, float16 weights, token ids), {n:,} tokens; default compression (HDF5: Blosc LZ4 + "
        "bit-shuffle, 8192-token chunks; Arrow: Zstd level 1, ~8 MiB record batches). Reads stream "
        f"65,536-token chunks in a fresh process, median of {args.repeats} after a warm-up run (page cache "
        "warm); peak memory is that process's maximum RSS (Python, NumPy, h5py, pyarrow included). Write "
        f"throughput counts appends only (synthesis ran at {synth_rate / 1e6:.2f} M tokens/s on top). Load "
        f"average {load} (the cores are shared with other jobs, so absolute rates vary run to run).",
        "",
        "| encoding | write tokens/s | read all columns tokens/s | ids-only read tokens/s | bytes/token | "
        "bytes/token without weights | peak RSS, all columns | peak RSS, ids only |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name, r in results.items():
        all_rate = r["all"]["tokens"] / statistics.median(r["all"]["times"])
        ids_rate = r["ids"]["tokens"] / statistics.median(r["ids"]["times"])
        lines.append(
            f"| {name} | {r['write'] / 1e6:.2f} M | {all_rate / 1e6:.2f} M | **{ids_rate / 1e6:.1f} M** | "
            f"{r['bytes']:.1f} | {r['bytes_ids']:.1f} | {r['all']['peak_rss'] / 2**20:.0f} MB | "
            f"{r['ids']['peak_rss'] / 2**20:.0f} MB |"
        )
    raw = 16 * 8
    lines += [
        "",
        "Targets: ids-only streaming read >= 10 M tokens/s; peak memory < 500 MB whatever the trace's size. "
        f"Raw sizes: ids {raw} B/token, float16 weights {2 * raw} B/token, other columns 17 B/token.",
        "",
        f"Compression choices for an ids-only trace ({args.compare_tokens:,} tokens, same chunks, in-process "
        f"reads, median of {args.repeats}):",
        "",
        "| encoding | compression | bytes/token (ids + 17 B of other columns) | ids-only read tokens/s |",
        "|---|---|---:|---:|",
    ]
    for encoding, compression, size, rate in compare:
        lines.append(f"| {encoding} | {compression} | {size:.1f} | {rate / 1e6:.1f} M |")
    markdown = "\n".join(lines)
    print(markdown)
    if not args.no_update:
        update_section("traces", markdown)


if __name__ == "__main__":
    main()
