"""The replay's passes on a Dask cluster (simulator.cluster): fit counts and shard replays by token range,
each worker reading its range of the trace itself; the driver merges them exactly (integer sums; segments
absorbed in trace order, as the threaded pass does)."""

from __future__ import annotations

from typing import Any

import numpy as np

from simulator import kernels as K
from simulator.cluster import Cluster
from simulator.replay.config import Progress
from simulator.replay.fitting import zero_counts
from simulator.replay.segment import (
    FIELDS,
    Segment,
    VariantArrays,
    new_segment,
    scored_phases,
    shard_ranges,
)
from traces.chunk import numbered
from traces.reader import Trace


def count_range(trace: Trace, _shared: None, start: int, stop: int, phase_filter: int, fit_stop: int,
                with_cosel: bool, chunk_tokens: int) -> tuple[np.ndarray, np.ndarray]:
    """A cluster task: load [L, E] and co-selection [L, E, E] (or [1, 1, 1]) over tokens [start, stop)."""
    load, cosel = zero_counts(trace.metadata, with_cosel)
    for t0, chunk in numbered(trace.iter_chunks(("expert_ids", "phase"), chunk_tokens, start, stop), start):
        assert chunk.expert_ids is not None and chunk.phase is not None
        K.count_load(chunk.expert_ids, chunk.phase, t0, phase_filter, fit_stop, load, cosel, with_cosel)
    return load, cosel


def count_on_cluster(cluster: Cluster, trace: Trace, stop: int, phase_filter: int, with_cosel: bool,
                     chunk_tokens: int) -> tuple[np.ndarray, np.ndarray]:
    """fitting.fit_statistics' counts over tokens [0, stop), by ranges as long as the replay's shards."""
    load, cosel = zero_counts(trace.metadata, with_cosel)
    items = [(a, b, phase_filter, stop, with_cosel, chunk_tokens)
             for a, b in shard_ranges(stop, 0, chunk_tokens)]
    for part_load, part_cosel in cluster.map(count_range, trace, items):
        load += part_load
        cosel += part_cosel
    return load, cosel


def replay_range(trace: Trace, shared: tuple[VariantArrays, np.ndarray, np.ndarray], start: int, stop: int,
                 sel_offset: tuple[int, int], phase_filter: int, score_start: int,
                 chunk_tokens: int, dispatch: str = "static") -> dict[str, Any]:
    """A cluster task: the shard [start, stop) replayed into a fresh segment; returns its state()."""
    arrays, model, cost = shared
    seg = new_segment(arrays, model, cost, trace.metadata.num_moe_layers, sel_offset, dispatch)
    seg.feed_chunks(numbered(trace.iter_chunks(FIELDS, chunk_tokens, start, stop), start), phase_filter,
                    score_start)
    return seg.state()


def run_on_cluster(cluster: Cluster, trace: Trace, arrays: VariantArrays, model: np.ndarray, cost: np.ndarray,
                   ranges: list[tuple[int, int]], phase_filter: int, score_start: int, chunk_tokens: int,
                   progress: Progress | None, dispatch: str = "static") -> Segment:
    """segment.run_variants' shards replayed on the workers and absorbed here in trace order. Each shard's
    offset (scored tokens per phase before it) comes from one pass over the phase column here."""
    merged = new_segment(arrays, model, cost, trace.metadata.num_moe_layers, dispatch=dispatch)
    if progress is not None:
        progress(ranges[0][0] if ranges else trace.num_tokens)
    if not ranges:
        return merged
    offsets: list[tuple[int, int]] = []
    scored = np.zeros(2, dtype=np.int64)
    for t0, chunk in numbered(trace.iter_chunks(("phase",), chunk_tokens, ranges[0][0]), ranges[0][0]):
        if len(offsets) < len(ranges) and t0 == ranges[len(offsets)][0]:
            offsets.append((int(scored[0]), int(scored[1])))
        assert chunk.phase is not None
        scored += scored_phases(chunk.phase, t0, score_start, phase_filter)
    items = [(a, b, off, phase_filter, score_start, chunk_tokens, dispatch)
             for (a, b), off in zip(ranges, offsets, strict=True)]
    shared = cluster.share((arrays, model, cost))
    for (a, b), state in zip(ranges, cluster.map(replay_range, trace, items, shared), strict=True):
        seg = type(merged).from_state(arrays, model, cost, state)
        if a == ranges[0][0]:
            merged = seg
        else:
            merged.absorb(seg)
        if progress is not None:
            progress(b - a)
    return merged
