"""Replay a trace on a GPU layout: fit placements on the first part of the trace, score them on the rest.

Pipeline: `fit_statistics` reads the fit part (load [L, E] and co-selection [L, E, E]); placements are fitted;
`run_variants` streams the scored part once through kernels.replay_chunk for every variant at once; a
`Segment` holds everything a pass produced and absorbs the next segment's exactly (steps straddling the
boundary are joined before they are priced); `summarise` turns a segment into per-variant summaries.

Modules: config (ReplayConfig, Variant), fitting (fit statistics and fitted variants), segment (kernel-state
plumbing: VariantArrays, Segment, the one-pass driver), results (summaries), render (the tables as text).
Shape legend: L MoE layers, E experts, K top-k, V variants (placement x tokens-per-step), H hardware specs,
G GPUs, S slots per GPU, W accumulator width (see kernels.py).
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING

from simulator.options import DEFAULT_FIT_FRACTION, PHASES
from simulator.placement import NEEDS_COSELECTION
from simulator.replay.config import DEFAULT_PLACEMENTS, Progress, ReplayConfig, Variant
from simulator.replay.fitting import (
    FitStatistics,
    check_placement_matches,
    fit_statistics,
    fit_stop,
    fit_variants,
)
from simulator.replay.results import HardwareTiming, ReplayResult, VariantSummary, summarise
from simulator.replay.segment import Segment, VariantArrays, merge_groups, run_variants, split_phases
from traces.errors import InputError
from traces.reader import Trace

if TYPE_CHECKING:
    from simulator.cluster import Cluster

__all__ = [
    "DEFAULT_FIT_FRACTION", "DEFAULT_PLACEMENTS", "PHASES", "FitStatistics", "HardwareTiming", "Progress",
    "ReplayConfig", "ReplayResult", "Segment", "Variant", "VariantArrays", "VariantSummary",
    "check_placement_matches", "fit_statistics", "fit_stop", "fit_variants", "merge_groups", "replay",
    "run_variants", "split_phases",
    "summarise",
]


def replay(trace: Trace, config: ReplayConfig, progress: Progress | None = None,
           cluster: Cluster | None = None) -> ReplayResult:
    """Fit every placement in config on the fit part of the trace and score them all in one pass over the
    rest (its counts and shards on the cluster's workers when one is given: the same result)."""
    meta = trace.metadata
    if trace.num_tokens == 0:
        raise InputError(f"{trace.paths[0]}: trace has no tokens")
    config, _ = config.resolved(meta.num_experts)
    stats = fit_statistics(
        trace, fit_fraction=config.fit_fraction, phase=config.phase, tokens_per_step=config.tokens_per_step,
        with_coselection=any(p in NEEDS_COSELECTION for p in config.placements),
        chunk_tokens=config.chunk_tokens, cluster=cluster,
    )
    if stats.score_start >= trace.num_tokens:
        raise InputError(f"{trace.paths[0]}: nothing left to score after fitting on {stats.fit_tokens} "
                         "tokens (lower --fit-fraction)")
    skipped: list[tuple[str, str]] = []
    variants = fit_variants(stats, meta, policies=tuple(config.placements), num_gpus=config.num_gpus,
                            gpus_per_node=config.gpus_per_node, redundant_experts=config.redundancy,
                            tokens_per_step=config.tokens_per_step, skipped=skipped)
    if not variants:
        raise InputError("no placement applies to this layout: " + "; ".join(f"{p}: {r}" for p, r in skipped))
    members, groups = split_phases(variants, config.tokens_per_step > 0 and config.phase == "all")
    seg = run_variants(trace, members, [config.hardware], phase=config.phase, score_start=stats.score_start,
                       capacity_factor=config.capacity_factor, chunk_tokens=config.chunk_tokens,
                       progress=progress, cluster=cluster, dispatch=config.dispatch)
    seg = merge_groups(seg, groups)
    summaries = summarise(seg, variants, [config.hardware], meta, hbm_reserve=config.hbm_reserve)
    if summaries and summaries[0].tokens == 0:
        raise InputError(f"{trace.paths[0]}: no {config.phase} tokens to score")
    cfg = dataclasses.asdict(config) | {"hardware": config.hardware.to_dict(),
                                        "placements": list(config.placements)}
    return ReplayResult(
        trace=[str(p) for p in trace.paths], metadata=meta.to_dict(), config=cfg, fit_tokens=stats.fit_tokens,
        score_start=stats.score_start, total_tokens=trace.num_tokens, placements=summaries,
        fitted_placements=[v.placement for v in variants], fit_load=stats.load, skipped=skipped,
    )

