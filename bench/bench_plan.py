"""A 20-point `plan` sweep in one pass against 20 separate `replay` runs of the same grid points.

    python -m bench.bench_plan [--tokens 10000000]

Grid: 5 GPU types (h100, h200, b200, a100, mi300x) x 2 GPU counts (8, 16; 8 per node) x 2 placements (balanced,
replicated + 16) = 20 points. The sweep routes each (GPU count, placement) once (4 kernel variants) and prices every
finished step on all 5 GPU types; the separate runs call `replay` once per point, each fitting and reading the
trace again. Same trace (bench_replay's synthetic OLMoE, steps of 4096 tokens) and fit fraction for both.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from bench.bench_replay import build_trace
from bench.common import machine, update_section
from simulator.hardware import GpuSpec
from simulator.plan import PlanConfig, plan
from simulator.replay import ReplayConfig, replay
from traces import open_trace

HARDWARE = ("h100", "h200", "b200", "a100", "mi300x")
GPUS = (8, 16)
PLACEMENTS = ("balanced", "replicated")
REDUNDANT = 16
TOKENS_PER_STEP = 4096


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=10_000_000)
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args()
    gpus = [GpuSpec.from_name(h) for h in HARDWARE]
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "olmoe.h5"
        build_trace(path, args.tokens)
        with open_trace(path) as tr:
            # warm the kernels (compile or cache load) outside the timings
            replay(tr, ReplayConfig(num_gpus=8, placements=PLACEMENTS, redundant_experts=REDUNDANT,
                                    tokens_per_step=TOKENS_PER_STEP, fit_fraction=0.99))
            t = time.perf_counter()
            config = PlanConfig(target_tokens_per_s=1e6, hardware=gpus, gpus=list(GPUS), gpus_per_node=8,
                                placements=list(PLACEMENTS), redundant_experts=[REDUNDANT],
                                tokens_per_step=[TOKENS_PER_STEP])
            result = plan(tr, config)
            sweep_s = time.perf_counter() - t
            assert len(result.candidates) == 20
            t = time.perf_counter()
            separate = []
            for hw in gpus:
                for g in GPUS:
                    for policy in PLACEMENTS:
                        cfg = ReplayConfig(num_gpus=g, gpus_per_node=8, hardware=hw, placements=(policy,),
                                           redundant_experts=REDUNDANT, tokens_per_step=TOKENS_PER_STEP)
                        separate.append(replay(tr, cfg).placements[0])
            separate_s = time.perf_counter() - t
            tokens = tr.num_tokens
    # the sweep and the separate runs must agree on what they predict
    by_key = {(c.hardware, c.num_gpus, c.policy): c for c in result.candidates}
    worst = 0.0
    for s in separate:
        c = by_key[(s.timings[0].hardware, s.num_gpus, s.policy)]
        worst = max(worst, abs(c.moe_ms / 1e3 - s.timings[0].step_time["mean"]) / s.timings[0].step_time["mean"])
    rec = result.recommendation
    text = "\n".join([
        "## Plan sweep (`python -m bench.bench_plan`)",
        "",
        f"Machine: {machine()}. Synthetic OLMoE-1B-7B trace of {tokens:,} tokens (fit on the first quarter, scored "
        f"on the rest), steps of {TOKENS_PER_STEP} tokens. Grid: {' / '.join(HARDWARE)} x {GPUS[0]} or {GPUS[1]} "
        f"GPUs x balanced or replicated+{REDUNDANT} = 20 points.",
        "",
        "| run | seconds |",
        "|---|---:|",
        f"| `plan`: 20 points in one pass (4 kernel variants, each step priced on 5 GPU types) | {sweep_s:.1f} |",
        f"| 20 separate `replay` runs, one point each | {separate_s:.1f} |",
        "",
        f"- The sweep is **{separate_s / sweep_s:.1f}x** faster than the separate runs (target: several times).",
        f"- Largest difference between the sweep's and the separate runs' MoE step time: {worst:.1e} (relative).",
        f"- Recommendation at 1M tokens/s: {rec.describe() if rec else 'none'}.",
    ])
    print(text)
    if not args.no_write:
        update_section("plan", text)


if __name__ == "__main__":
    main()
