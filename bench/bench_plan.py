"""A 20-point `plan` sweep in one pass against 20 separate `replay` runs of the same grid points.

    python -m bench.bench_plan [--tokens 10000000]

Grid: 5 GPU types (h100, h200, b200, a100, mi300x) x 2 GPU counts (8, 16; 8 per node) x 2 placements
(balanced, replicated + 16) = 20 points, 512 tokens per GPU per step (4096-token steps on 8 GPUs, 8192 on 16),
prefill tokens. The sweep routes each (GPU count, placement) once (4 kernel variants) and prices every
finished step on all 5 GPU types; the separate runs call `replay` once per point (--phase prefill
--tokens-per-step 512 x G), each fitting and reading the trace again. Same trace (bench_replay's synthetic
OLMoE) and fit fraction for both. A third timing runs the same sweep with --phase all, where each point
replays prefill and decode steps apart (8 kernel variants).
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

from bench.bench_replay import build_trace
from bench.common import machine, median_time, update_section
from simulator.hardware import GpuSpec
from simulator.plan import PlanConfig, PlanResult, plan
from simulator.replay import ReplayConfig, VariantSummary, replay
from traces import open_trace

HARDWARE = ("h100", "h200", "b200", "a100", "mi300x")
GPUS = (8, 16)
PLACEMENTS = ("balanced", "replicated")
REDUNDANT = 16
TOKENS_PER_GPU = 512
# one kernel variant per point, so the separate `replay` runs predict exactly the same steps
PHASE = "prefill"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=10_000_000)
    parser.add_argument("--repeats", type=int, default=3, help="runs of each timing (the median is reported)")
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args()
    gpus = [GpuSpec.from_name(h) for h in HARDWARE]
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "olmoe.h5"
        build_trace(path, args.tokens)
        with open_trace(path) as tr:
            # warm the kernels (compile or cache load) outside the timings
            replay(tr, ReplayConfig(num_gpus=8, placements=PLACEMENTS, redundant_experts=REDUNDANT,
                                    tokens_per_step=TOKENS_PER_GPU * 8, fit_fraction=0.99))
            grid = dict(target_tokens_per_s=1e6, hardware=gpus, gpus=list(GPUS), gpus_per_node=8,
                        placements=list(PLACEMENTS), redundant_experts=[REDUNDANT],
                        tokens_per_gpu=[TOKENS_PER_GPU])
            plans: dict[str, PlanResult] = {}

            def sweep(phase: str) -> None:
                plans[phase] = plan(tr, PlanConfig(phase=phase, **grid))  # type: ignore[arg-type]

            sweep_s = median_time(lambda: sweep(PHASE), repeats=args.repeats, warmup=0)
            both_s = median_time(lambda: sweep("all"), repeats=args.repeats, warmup=0)
            result, both = plans[PHASE], plans["all"]
            assert len(result.candidates) == 20, result.skipped
            assert len(both.candidates) == 20, both.skipped
            separate: list[VariantSummary] = []

            def separate_runs() -> None:
                separate.clear()
                for hw in gpus:
                    for g in GPUS:
                        for policy in PLACEMENTS:
                            cfg = ReplayConfig(num_gpus=g, gpus_per_node=8, hardware=hw, placements=(policy,),
                                               redundant_experts=REDUNDANT,
                                               tokens_per_step=TOKENS_PER_GPU * g, phase=PHASE)
                            separate.append(replay(tr, cfg).placements[0])

            separate_s = median_time(separate_runs, repeats=args.repeats, warmup=0)
            tokens = tr.num_tokens
    # the sweep and the separate runs must agree on what they predict
    by_key = {(c.hardware, c.num_gpus, c.policy): c for c in result.candidates}
    worst = 0.0
    for s in separate:
        c = by_key[(s.timings[0].hardware, s.num_gpus, s.policy)]
        worst = max(worst, abs(c.moe_ms / 1e3 - s.timings[0].step_time["mean"])
                    / s.timings[0].step_time["mean"])
    rec = result.recommendation
    rec_both = both.recommendation
    text = "\n".join([
        "## Plan sweep (`python -m bench.bench_plan`)",
        "",
        f"Machine: {machine()}. Synthetic OLMoE-1B-7B trace of {tokens:,} tokens (fit on the first quarter, "
        f"scored on the rest), {PHASE} tokens in steps of {TOKENS_PER_GPU} tokens per GPU "
        f"({TOKENS_PER_GPU * GPUS[0]} on {GPUS[0]} GPUs, {TOKENS_PER_GPU * GPUS[1]} on {GPUS[1]}). Grid: "
        f"{' / '.join(HARDWARE)} x {GPUS[0]} or {GPUS[1]} GPUs x balanced or replicated+{REDUNDANT} = 20 "
        "points.",
        "",
        f"| run | seconds (median of {args.repeats}) |",
        "|---|---:|",
        "| `plan`: 20 points in one pass (4 kernel variants, each step priced on 5 GPU types) | "
        f"{sweep_s:.1f} |",
        f"| 20 separate `replay` runs, one point each | {separate_s:.1f} |",
        f"| `plan --phase all`: the same 20 points, prefill and decode steps apart (8 kernel variants) | "
        f"{both_s:.1f} |",
        "",
        f"- The sweep is **{separate_s / sweep_s:.1f}x** faster than the separate runs (target: several "
        "times).",
        f"- Largest difference between the sweep's and the separate runs' MoE step time: {worst:.1e} "
        "(relative).",
        f"- Recommendation at 1M tokens/s: {rec.describe() if rec else 'none'} (prefill); "
        f"{rec_both.describe() if rec_both else 'none'} (all tokens).",
    ])
    print(text)
    if not args.no_write:
        update_section("plan", text)


if __name__ == "__main__":
    main()
