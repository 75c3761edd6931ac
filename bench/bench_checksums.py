"""Read throughput with block checksums (format 1.1) against the release before them, side by side.

    python -m bench.bench_checksums --tokens 2000000

The baseline is the commit before traces/checksum.py was added, extracted with `git archive`: it writes its own
(unchecked) trace and reads it; this tree writes a checked trace of the same synthetic content and reads it,
verifying every block. Reads run in fresh processes, alternating baseline and checked runs so that load on the
shared machine falls on both alike; each figure is the median of --repeats runs after a warm-up (page cache warm).
Figures go to docs/benchmarks.md (section "checksums").
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from bench.bench_traces import READER
from bench.common import machine, update_section

ROOT = Path(__file__).resolve().parent.parent
ALL_COLUMNS = ["seq_id", "position", "token_id", "phase", "step", "expert_ids", "expert_weights"]
SUFFIXES = {"hdf5": ".h5", "arrow": ".arrow"}


def baseline_tree(folder: Path) -> tuple[str, Path]:
    """(commit, folder) of the source tree just before block checksums."""
    added = subprocess.run(["git", "log", "--diff-filter=A", "--format=%H", "--", "traces/checksum.py"], cwd=ROOT,
                           capture_output=True, text=True, check=True).stdout.split()
    if not added:
        sys.exit("bench_checksums: cannot find the commit that added traces/checksum.py (run it in a git checkout)")
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
    subprocess.run([sys.executable, "-c", code, "synth", "-o", str(out), "--tokens", str(tokens), "--seed", "1",
                    "--force"], check=True, capture_output=True, cwd=root)


def read_once(root: Path, path: Path, fields: list[str]) -> tuple[int, float]:
    """(tokens, seconds) of one streamed read after a warm-up, in a fresh process."""
    out = subprocess.run([sys.executable, "-c", READER.format(root=str(root)), str(path), ",".join(fields), "1"],
                         capture_output=True, text=True, check=True, cwd=root)
    got = json.loads(out.stdout)
    return got["tokens"], got["times"][0]


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
                times: dict[str, list[float]] = {"old": [], "new": []}
                for _ in range(args.repeats):
                    for key, root, path in (("old", old_root, old), ("new", ROOT, new)):
                        tokens, seconds = read_once(root, path, fields)
                        assert tokens == args.tokens
                        times[key].append(seconds)
                rate = {k: args.tokens / statistics.median(v) for k, v in times.items()}
                rows.append((encoding, label, rate["old"], rate["new"], rate["new"] / rate["old"] - 1))
                print(encoding, label, {k: f"{v / 1e6:.2f} M/s" for k, v in rate.items()}, flush=True)
    table = "\n".join(f"| {e} | {label} | {o / 1e6:.2f} M | {n / 1e6:.2f} M | {d:+.1%} |"
                      for e, label, o, n, d in rows)
    markdown = f"""## Read throughput with block checksums (`python -m bench.bench_checksums`)

Machine: {machine()}. Synthetic OLMoE-1B-7B trace (`moe-sim synth --seed 1`), {args.tokens:,} tokens, default
compression; streamed reads of 65,536-token chunks in a fresh process, median of {args.repeats} runs each, baseline
and checked runs alternating. Baseline: commit {commit} (before format 1.1) reading the unchecked file it wrote;
checked: this tree reading the format 1.1 file it wrote, verifying every block's checksum and the header digest
(HDF5: also the forked structure probe at open).

| encoding | columns | baseline tokens/s | checked tokens/s | change |
|---|---|---:|---:|---:|
{table}

Target: within 10% of the baseline. The two trees read equal content; the machine's 2 cores are shared with other
jobs, so single runs vary by several percent either way."""
    if args.no_write:
        print(markdown)
    else:
        update_section("checksums", markdown)


if __name__ == "__main__":
    main()
