"""The plan's grid: every (GPU count, placement, redundancy, batch) point as kernel variants of one pass."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import numpy as np

from simulator.options import PHASES
from simulator.placement import USES_REDUNDANCY
from simulator.plan.config import PlanConfig
from simulator.replay import Segment, Variant, fit_variants
from traces.errors import InputError
from traces.reader import Trace
from traces.schema import PHASE_DECODE, PHASE_NAMES, PHASE_PREFILL


@dataclass(frozen=True)
class GridPoint:
    """One (GPU count, placement, redundancy, batch) point: its kernel variants (one per phase replayed
    apart)."""

    variant: Variant  # the point as one variant (phase -1), for labels and the summary
    batch: int  # per-GPU batch, or absolute tokens per step
    members: tuple[int, ...]  # indices of its kernel variants in the pass


def scored_phase_tokens(trace: Trace, score_start: int, chunk_tokens: int) -> np.ndarray:
    """[2] scored tokens per phase (prefill, decode): a pass over the phase column only."""
    counts = np.zeros(2, dtype=np.int64)
    t0 = 0
    for chunk in trace.iter_chunks(("phase",), chunk_tokens):
        assert chunk.phase is not None
        n = chunk.num_tokens
        if t0 + n > score_start:
            counts += np.bincount(chunk.phase[max(0, score_start - t0):], minlength=2)[:2]
        t0 += n
    return counts


def too_short(config: PlanConfig, step: int, num_gpus: int, batch: int, scored: np.ndarray) -> str | None:
    """Why the scored part cannot fill enough steps of this size (None when it can)."""
    phases = [PHASES[config.phase]] if config.phase != "all" else [p for p in (PHASE_PREFILL, PHASE_DECODE)
                                                                     if scored[p] > 0]
    short = [p for p in phases if scored[p] // step < config.min_full_steps]
    if not short:
        return None
    size = f"{batch} tokens/GPU x {num_gpus} GPUs = {step:,} tokens per step" if config.per_gpu \
        else f"{step:,} tokens per step"
    have = ", ".join(f"{scored[p]:,} scored {PHASE_NAMES[p]} tokens ({scored[p] // step} full steps)"
                     for p in short)
    return (f"{size} needs {config.min_full_steps} full steps per phase; the trace has {have} "
            "(record a longer trace, or lower the batch)")


def grid_points(trace: Trace, config: PlanConfig, stats: Any,
                scored: np.ndarray) -> tuple[list[GridPoint], list[Variant], list[str]]:
    """Fit every (GPU count, policy, redundancy) once and pair it with every batch; the variants of one
    pass."""
    meta = trace.metadata
    points: list[GridPoint] = []
    variants: list[Variant] = []
    skipped: list[str] = []
    split = config.phase == "all"
    for g in config.gpus:
        for policy in config.placements:
            redundancies = config.redundant_experts if policy in USES_REDUNDANCY else [0]
            for r in sorted(set(redundancies)):
                try:
                    fitted = fit_variants(stats, meta, policies=(policy,), num_gpus=g,
                                          gpus_per_node=config.gpus_per_node, redundant_experts=r,
                                          tokens_per_step=0)[0]
                except InputError as exc:
                    skipped.append(f"{policy} R={r} on {g} GPUs: {exc}")
                    continue
                for b in config.batches:
                    step = config.step_tokens(b, g)
                    point = dataclasses.replace(fitted, tokens_per_step=step)
                    name = f"{point.label} on {g} GPUs, " + (f"{b} tokens/GPU" if config.per_gpu
                                                               else f"{step} tokens/step")
                    why = too_short(config, step, g, b, scored) if step > 0 else None
                    if why:
                        skipped.append(f"{name}: {why}")
                        continue
                    if step > 0 and split:  # prefill and decode steps apart, in the same pass
                        members = [dataclasses.replace(point, phase=p) for p in (PHASE_PREFILL, PHASE_DECODE)
                                   if scored[p] > 0]
                    else:
                        members = [point]
                    points.append(GridPoint(point, b,
                                            tuple(range(len(variants), len(variants) + len(members)))))
                    variants.extend(members)
    if not points:
        raise InputError("plan: no grid point can be built or planned; "
                         + (skipped[0] if skipped else "empty grid"))
    return points, variants, skipped


def step_prefill_flags(seg: Segment, variants: list[Variant], members: tuple[int, ...],
                       phase: str) -> np.ndarray:
    """[steps] True for prefill steps of a grid point, in merge_groups' step order (members in order). A
    member replaying one phase (split, or --phase) knows its steps' phase; recorded steps of both phases count
    as decode (the non-expert model's conservative side for attention over a cache)."""
    flags = []
    for m in members:
        n = sum(a.size for a in seg.step_ntok[m])  # steps of member m, without joining its arrays
        ph = variants[m].phase if variants[m].phase >= 0 else PHASES[phase]
        flags.append(np.full(n, ph == PHASE_PREFILL))
    return np.concatenate(flags) if flags else np.zeros(0, dtype=bool)


