"""Fitting: count load (and co-selection) on the fit part of a trace, then fit every placement on it.

Shape legend: L MoE layers, E experts.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from simulator import kernels as K
from simulator.options import PHASES
from simulator.placement import Placement, PlacementNotApplicable, fit_placement
from simulator.placement.routing import RoutingSample, StepSampler, count_cross_layer
from simulator.replay.config import Variant
from traces.chunk import numbered
from traces.errors import InputError
from traces.reader import DEFAULT_CHUNK_TOKENS, Trace
from traces.schema import TraceMetadata

if TYPE_CHECKING:
    from simulator.cluster import Cluster


@dataclass
class FitStatistics:
    """Counts over the fit part. load [L, E]; coselection [L, E, E] or None; score_start: first scored
    token; routing: sampled steps and cross-layer co-selection, gathered with the co-selection."""

    load: np.ndarray
    coselection: np.ndarray | None
    fit_tokens: int
    score_start: int
    routing: RoutingSample | None = None


def fit_statistics(trace: Trace, *, fit_fraction: float, phase: str, tokens_per_step: int,
                   with_coselection: bool, chunk_tokens: int = DEFAULT_CHUNK_TOKENS,
                   cluster: Cluster | None = None) -> FitStatistics:
    """Load (and co-selection, cross-layer co-selection and a sample of whole steps, for the traffic-aware
    policies) over the first fit_fraction of the trace's tokens. With a cluster, load and co-selection are
    counted on its workers by token range (integer sums: the same counts); the traffic sample needs the
    tokens in order, so with co-selection the count stays here.

    The scored part starts at the first recorded step boundary at or after that point (so no step is split
    between fitting and scoring); with fit_fraction 0 the whole trace is both fitted and scored.
    """
    meta = trace.metadata
    layers, experts = meta.num_moe_layers, meta.num_experts
    cross = np.zeros((max(layers - 1, 0), experts, experts) if with_coselection else (0, 1, 1),
                     dtype=np.int64)
    sampler = StepSampler()
    sel_count = np.zeros(2, dtype=np.int64)  # fit tokens per phase so far (regrouped step keys)
    total = trace.num_tokens
    if fit_fraction <= 0:
        stop = total
        score_start = 0
    else:
        stop = fit_stop(trace, fit_fraction, phase, chunk_tokens)
        score_start = -1
    if cluster is not None and not with_coselection:
        from simulator.replay.distributed import count_on_cluster

        load, cosel = count_on_cluster(cluster, trace, stop, PHASES[phase], with_coselection, chunk_tokens)
        if score_start < 0:
            score_start = first_scored_token(trace, stop, tokens_per_step, chunk_tokens)
    else:
        load, cosel = zero_counts(meta, with_coselection)
        t0 = 0
        last_step = None
        for chunk in trace.iter_chunks(("expert_ids", "step", "phase"), chunk_tokens):
            n = chunk.num_tokens
            assert chunk.expert_ids is not None and chunk.step is not None and chunk.phase is not None
            if t0 < stop:
                K.count_load(chunk.expert_ids, chunk.phase, t0, PHASES[phase], stop, load, cosel,
                             with_coselection)
                if with_coselection:
                    _sample_chunk(chunk.expert_ids, chunk.step, chunk.phase, t0, stop, PHASES[phase],
                                  tokens_per_step, sel_count, sampler, cross)
            if score_start < 0 and t0 + n > stop:
                score_start = step_boundary(chunk.step, t0, stop, tokens_per_step, last_step)
            last_step = chunk.step[-1] if n else last_step
            t0 += n
            if score_start >= 0 and t0 >= stop:
                break
        if score_start < 0:
            score_start = total
    if fit_fraction > 0 and load.sum() == 0:
        raise InputError(f"{trace.paths[0]}: the fit part (the first {stop:,} tokens) holds no {phase} "
                         "assignments to fit placements on (raise --fit-fraction, or 0 to fit on everything)")
    routing = sampler.sample(cross, layers, meta.top_k) if with_coselection else None
    return FitStatistics(load, cosel if with_coselection else None, stop, score_start, routing)


def _sample_chunk(ids: np.ndarray, steps: np.ndarray, phases: np.ndarray, t0: int, stop: int, phase_code: int,
                  tokens_per_step: int, sel_count: np.ndarray, sampler: StepSampler,
                  cross: np.ndarray) -> None:
    """Feed one chunk's fit tokens to the step sampler (steps keyed as the replay keys them, kernels.step_key)
    and to the cross-layer counts."""
    n = min(ids.shape[0], stop - t0)
    keep = np.zeros(ids.shape[0], dtype=bool)
    keep[:n] = True
    if phase_code >= 0:
        keep &= phases == phase_code
    if cross.shape[0]:
        count_cross_layer(ids, keep, cross)
    rows = np.flatnonzero(keep)
    if tokens_per_step > 0:
        ph = phases[rows].astype(np.int64)
        within = np.empty(rows.size, dtype=np.int64)
        for p in (0, 1):
            mask = ph == p
            within[mask] = sel_count[p] + np.arange(int(mask.sum()))
            sel_count[p] += int(mask.sum())
        key = ph * (1 << 40) + within // tokens_per_step
    else:
        key = steps[rows].astype(np.int64)
    sampler.add(ids[rows], t0 + rows, key)


def zero_counts(meta: TraceMetadata, with_coselection: bool) -> tuple[np.ndarray, np.ndarray]:
    """Empty load [L, E] and co-selection [L, E, E] ([1, 1, 1] when not counted) int64 counters."""
    layers, experts = meta.num_moe_layers, meta.num_experts
    return (np.zeros((layers, experts), dtype=np.int64),
            np.zeros((layers, experts, experts) if with_coselection else (1, 1, 1), dtype=np.int64))


def step_boundary(step: np.ndarray, t0: int, stop: int, tokens_per_step: int, last_step: Any) -> int:
    """The first token at or after `stop` that starts a recorded step (regrouped steps start anywhere), in a
    chunk of steps whose first token is t0 and which reaches past stop; -1 when the chunk holds none.
    last_step: the recorded step of the token before the chunk (None at the trace's start)."""
    local = max(0, stop - t0)
    if tokens_per_step > 0 or local == 0 and (last_step is None or step[0] != last_step):
        return t0 + local
    prev = step[local - 1] if local > 0 else last_step
    change = np.flatnonzero(step[local:] != prev)
    return t0 + local + int(change[0]) if change.size else -1


def first_scored_token(trace: Trace, stop: int, tokens_per_step: int, chunk_tokens: int) -> int:
    """step_boundary over the step column alone, from the chunk holding token stop - 1 (the trace's length
    when no step starts at or after stop)."""
    begin = max(stop - 1, 0) // chunk_tokens * chunk_tokens
    last_step = None
    for t0, chunk in numbered(trace.iter_chunks(("step",), chunk_tokens, begin), begin):
        assert chunk.step is not None
        if t0 + chunk.num_tokens > stop:
            found = step_boundary(chunk.step, t0, stop, tokens_per_step, last_step)
            if found >= 0:
                return found
        last_step = chunk.step[-1] if chunk.num_tokens else last_step
    return trace.num_tokens


def fit_stop(trace: Trace, fit_fraction: float, phase: str, chunk_tokens: int = DEFAULT_CHUNK_TOKENS) -> int:
    """Global index where the fit part ends: after fit_fraction of the chosen phase's tokens (all tokens for
    "all"), so a trace that opens with a long prefill still fits decode placements on decode tokens."""
    total = trace.num_tokens
    if phase == "all":
        return int(total * fit_fraction)
    code = PHASES[phase]
    seen = 0
    for chunk in trace.iter_chunks(("phase",), chunk_tokens):
        assert chunk.phase is not None
        seen += int(np.count_nonzero(chunk.phase == code))
    wanted = int(seen * fit_fraction)
    if seen == 0 or wanted == 0:
        return int(total * fit_fraction)  # nothing of the phase to fit on: fit_statistics says so
    t0 = 0
    for chunk in trace.iter_chunks(("phase",), chunk_tokens):  # a second pass over one column, bounded memory
        assert chunk.phase is not None
        hits = np.flatnonzero(chunk.phase == code)
        if wanted <= hits.size:
            return t0 + int(hits[wanted - 1]) + 1
        wanted -= hits.size
        t0 += chunk.num_tokens
    return total


def fit_variants(stats: FitStatistics, meta: TraceMetadata, *, policies: tuple[str, ...], num_gpus: int,
                 gpus_per_node: int, redundant_experts: int, tokens_per_step: int,
                 skipped: list[tuple[str, str]] | None = None) -> list[Variant]:
    """One variant per policy. With `skipped`, a policy that cannot apply to this layout is left out and
    (policy, reason) appended there, so the others still replay; without it, it raises."""
    out = []
    for policy in policies:
        try:
            placement = fit_placement(policy, stats.load, num_gpus=num_gpus, gpus_per_node=gpus_per_node,
                                      redundant_experts=redundant_experts, coselection=stats.coselection,
                                      routing=stats.routing)
        except PlacementNotApplicable as exc:
            if skipped is None:
                raise
            skipped.append((policy, exc.reason))
            continue
        check_placement_matches(placement, meta, policy)
        # empty slots are no replicas
        r = int((placement.slots >= 0).sum() // placement.num_layers - meta.num_experts)
        label = policy if r == 0 or policy.startswith("file:") else f"{policy}+{r}"
        out.append(Variant(label, placement, tokens_per_step, max(r, 0)))
    return out


def check_placement_matches(placement: Placement, meta: TraceMetadata, source: str) -> None:
    """A placement must be for the trace's model: same layers and experts, and the same model id if it names
    one."""
    if placement.model_id is not None and placement.model_id != meta.model_id:
        raise InputError(f"{source}: placement is for model {placement.model_id!r} but the trace is from "
                         f"{meta.model_id!r}")
    if placement.num_experts != meta.num_experts or placement.num_layers != meta.num_moe_layers:
        raise InputError(
            f"{source}: placement is for {placement.num_layers} layers x {placement.num_experts} experts but "
            f"the trace ({meta.model_id}) has {meta.num_moe_layers} x {meta.num_experts}"
        )


