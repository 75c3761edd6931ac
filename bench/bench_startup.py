"""Start-up: the first `moe-sim replay` of a 100k-token trace with an empty Numba cache, and a warm one.

    python -m bench.bench_startup [--tokens 100000] [--repeats 3]

Each cold run gets a fresh cache directory (XDG_CACHE_HOME, where moe-trace keeps Numba's cache), so every
kernel the command uses is compiled; each warm run reuses the cache the cold run left. Wall time of the whole
command, medians, runs alternating cold and warm.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench.common import machine, update_section

ROOT = Path(__file__).resolve().parents[1]


def _moe_sim(args: list[str], cache: Path) -> float:
    env = dict(os.environ, XDG_CACHE_HOME=str(cache), PYTHONPATH=str(ROOT))
    env.pop("NUMBA_CACHE_DIR", None)
    t = time.perf_counter()
    subprocess.run([sys.executable, "-c", "import cli; cli.moe_sim()", *args], env=env, check=True,
                   capture_output=True)
    return time.perf_counter() - t


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=100_000)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args()
    load = os.getloadavg()[0]  # other work on the machine skews every figure; say how much there was
    cold, warm = [], []
    with tempfile.TemporaryDirectory() as tmp:
        trace = Path(tmp) / "t.h5"
        _moe_sim(["synth", "--model", "olmoe-1b-7b", "--tokens", str(args.tokens), "-o", str(trace)],
                 Path(tmp) / "s")
        for r in range(args.repeats):
            cache = Path(tmp) / f"cache{r}"
            cold.append(_moe_sim(["replay", str(trace), "--quiet"], cache))
            warm.append(_moe_sim(["replay", str(trace), "--quiet"], cache))
    md = "\n".join([
        "## Start-up (`python -m bench.bench_startup`)", "",
        f"`moe-sim replay` of a {args.tokens:,}-token synthetic OLMoE-1B-7B trace (default placements, 8 x "
        f"h100), whole command wall time, medians of {args.repeats} on {machine()} (load average "
        f"{load:.1f} at the start). Cold: an empty Numba cache, so every "
        "kernel the command uses compiles; warm: the cache the cold run left.", "",
        "| run | seconds | target |", "|---|---:|---:|",
        f"| cold (empty cache) | {statistics.median(cold):.1f} | 15 |",
        f"| warm | {statistics.median(warm):.1f} | 3 |"])
    print(md)
    if not args.no_write:
        update_section("startup", md)


if __name__ == "__main__":
    main()
