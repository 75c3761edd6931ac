"""Read throughput with block checksums (format 1.1) against the release before them, side by side.

    python -m bench.bench_checksums --tokens 2000000

The baseline is the commit before traces/checksum.py was added, extracted with `git archive`: it writes its
own (unchecked) trace and reads it; this tree writes a checked trace of the same synthetic content and reads
it, verifying every block. Reads run in fresh processes, alternating baseline and checked runs so that load on
the shared machine falls on both alike; each figure is the median of --repeats runs after a warm-up (page
cache warm). Figures go to docs/benchmarks.md (section "checksums").
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from bench.common import machine, update_section

ROOT = Path(__file__).resolve().parent.parent
ALL_COLUMNS = ["seq_id", "position", "token_id", "phase", "step", "expert_ids", "expert_weights"]
SUFFIXES = {"hdf5": ".h5", "arrow": ".arrow"}
# One warm-up read, then one timed read: wall time, and CPU time of the process (all its threads), which the
# other jobs on a shared machine disturb far less than wall time.
READER = """
import json, sys, time
sys.path.insert(0, {root!r})
from traces import open_trace
path, fields = sys.argv[1], sys.argv[2].split(",")
for i in range(2):
    wall, cpu, tokens = time.perf_counter(), time.process_time(), 0
    with open_trace(path) as trace:
        for chunk in trace.iter_chunks(fields, 1 << 16):
            tokens += chunk.num_tokens
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
print(json.dumps({{"tokens": tokens, "wall": wall, "cpu": cpu}}))
"""


def baseline_tree(folder: Path) -> tuple[str, Path]:
    """(commit, folder) of the source tree just before block checksums."""
    added = subprocess.run(["git", "log", "--diff-filter=A", "--format=%H", "--", "traces/checksum.py"],
                           cwd=ROOT, capture_output=True, text=True, check=True).stdout.split()
    if not added:
        sys.exit("bench_checksums: cannot find the commit that added traces/checksum.py (run it in a git "
                 "checkout)")
    commit = subprocess.run(["git", "rev-parse", "--short", f"{added[-1]}^"], cwd=ROOT, capture_output=True,
                            text=True, check=True).stdout.strip()
    archive = subprocess.run(["git", "archive", commit, "traces", "cli.py", "simulator", "recorder", "data"],
                             cwd=ROOT,
                             capture_output=True, check=True).stdout
    folder.mkdir(parents=True, exist_ok=True)
    subprocess.run(["tar", "-x", "-C", str(folder)], input=archive, check=True)
    return commit, folder


def synth(root: Path, out: Path, tokens: int) -> None:
    code = f"import sys; sys.path.insert(0, {str(root)!r}); import cli; cli.moe_sim()"
    subprocess.run([sys.executable, "-c", code, "synth", "-o", str(out), "--tokens", str(tokens),
                    "--seed", "1", "--force"], check=True, capture_output=True, cwd=root)


def read_once(root: Path, path: Path, fields: list[str]) -> dict:
    """{tokens, wall, cpu} of one streamed read after a warm-up, in a fresh process."""
    out = subprocess.run([sys.executable, "-c", READER.format(root=str(root)), str(path), ",".join(fields)],
                         capture_output=True, text=True, check=True, cwd=root)
    return json.loads(out.stdout)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=2_000_000)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--no-write", action="store_true", help="print the table without updating docs")
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        commit, old_root = baseline_tree(Path(tmp) / "baseline")
        for encoding, suffix in SUFFIXES.items():
            old, new = Path(tmp) / f"old{suffix}", Path(tmp) / f"new{suffix}"
            synth(old_root, old, args.tokens)
            synth(ROOT, new, args.tokens)
            for label, fields in (("all columns", ALL_COLUMNS), ("ids only", ["expert_ids"])):
                runs: dict[str, list[dict]] = {"old": [], "new": []}
                for _ in range(args.repeats):
                    for key, root, path in (("old", old_root, old), ("new", ROOT, new)):
                        got = read_once(root, path, fields)
                        assert got["tokens"] == args.tokens
                        runs[key].append(got)
                rate = {(k, clock): args.tokens / statistics.median(r[clock] for r in v)
                        for k, v in runs.items() for clock in ("cpu", "wall")}
                rows.append((encoding, label, rate))
                print(encoding, label, {k: f"{v / 1e6:.2f} M/s" for k, v in rate.items()}, flush=True)
    table = "\n".join(
        f"| {e} | {label} | {r['old', 'cpu'] / 1e6:.2f} M | {r['new', 'cpu'] / 1e6:.2f} M | "
        f"**{r['new', 'cpu'] / r['old', 'cpu'] - 1:+.1%}** | {r['old', 'wall'] / 1e6:.2f} M | "
        f"{r['new', 'wall'] / 1e6:.2f} M | {r['new', 'wall'] / r['old', 'wall'] - 1:+.1%} |"
        for e, label, r in rows)
    header = ("| encoding | columns | baseline tokens per CPU-s | checked tokens per CPU-s | change (CPU) | "
              "baseline tokens/s (wall) | checked tokens/s (wall) | change (wall) |")
    markdown = f"""## Read throughput with block checksums (`python -m bench.bench_checksums`)

Machine: {machine()}. Synthetic OLMoE-1B-7B trace (`moe-sim synth --seed 1`), {args.tokens:,} tokens,
default compression; streamed reads of 65,536-token chunks in a fresh process after a warm-up read (page
cache warm), median of {args.repeats} runs each, baseline and checked runs alternating. Baseline: commit
{commit} (before format 1.1) reading the unchecked file it wrote; checked: this tree reading the format 1.1
file it wrote, verifying every block's checksum and the header digest (HDF5: also the forked structure probe
at open).

{header}
|---|---|---:|---:|---:|---:|---:|---:|
{table}

Target: within 10% of the baseline. The two trees read equal content. The machine's 2 cores are shared with
other jobs, which moves wall-clock rates by tens of percent from run to run; CPU time per read (all threads
of the reading process) is the steadier comparison."""
    if args.no_write:
        print(markdown)
    else:
        update_section("checksums", markdown)


if __name__ == "__main__":
    main()
