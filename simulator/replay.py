"""Replay a trace on a GPU layout: fit placements on the first part of the trace, score them on the rest.

Shape legend: L MoE layers, E experts, K top-k, V variants (placement x tokens-per-step), H hardware specs,
G GPUs, S slots per GPU, W accumulator width (see kernels.py).

Pipeline: `fit_statistics` reads the fit part (load [L, E] and co-selection [L, E, E]); placements are fitted;
`run_variants` streams the scored part once through kernels.replay_chunk for every variant at once; a `Segment`
holds everything a pass produced and merges exactly with the next segment's (steps straddling the boundary are
joined before they are priced); `summarise` turns a segment into per-variant summaries.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from simulator import kernels as K
from simulator import metrics
from simulator.cost_model import (
    BF16_BYTES,
    DEFAULT_HBM_RESERVE,
    cost_matrix,
    expert_weight_bytes,
    model_vector,
    pricing_for,
)
from simulator.hardware import ClusterLayout, GpuSpec
from simulator.placement import NEEDS_COSELECTION, Placement, fit_placement
from traces.errors import InputError
from traces.reader import DEFAULT_CHUNK_TOKENS, Trace
from traces.schema import PHASE_DECODE, PHASE_PREFILL, TraceMetadata

PHASES = {"all": -1, "prefill": PHASE_PREFILL, "decode": PHASE_DECODE}
DEFAULT_PLACEMENTS = ("contiguous", "round-robin", "balanced", "replicated", "coactivation")
# Fit on the first quarter of the (phase-selected) tokens, score on the other three quarters: placements are never
# scored on the tokens they were fitted to, and the scored part stays the larger one.
DEFAULT_FIT_FRACTION = 0.25

Progress = Callable[[int], None]


@dataclass
class ReplayConfig:
    """What to replay and on what. `moe-sim replay` fills it from its options."""

    num_gpus: int = 8
    gpus_per_node: int = 8
    hardware: GpuSpec = field(default_factory=lambda: GpuSpec.from_name("h100"))
    placements: tuple[str, ...] = DEFAULT_PLACEMENTS  # policy names or file:PATH
    redundant_experts: int = 0  # R extra slots for replicated / coactivation
    tokens_per_step: int = 0  # 0: the recorded forward passes are the steps
    phase: str = "all"  # all, prefill or decode
    fit_fraction: float = DEFAULT_FIT_FRACTION  # 0: fit and score on the whole trace (optimistic)
    capacity_factor: float | None = None  # None: no tokens dropped
    chunk_tokens: int = DEFAULT_CHUNK_TOKENS
    hbm_reserve: float = DEFAULT_HBM_RESERVE  # HBM share kept for KV cache and activations

    def __post_init__(self) -> None:
        ClusterLayout(self.num_gpus, self.gpus_per_node)  # raises InputError on an impossible layout
        if self.phase not in PHASES:
            raise InputError(f"--phase must be one of {', '.join(PHASES)}, not {self.phase!r}")
        if not 0.0 <= self.fit_fraction < 1.0:
            raise InputError(f"--fit-fraction must be in [0, 1), got {self.fit_fraction}")
        if self.capacity_factor is not None and self.capacity_factor <= 0:
            raise InputError(f"--capacity-factor must be positive, got {self.capacity_factor}")
        if self.tokens_per_step < 0:
            raise InputError(f"--tokens-per-step must not be negative, got {self.tokens_per_step}")
        if self.redundant_experts < 0:
            raise InputError(f"--redundant-experts must not be negative, got {self.redundant_experts}")
        if not 0.0 <= self.hbm_reserve < 1.0:
            raise InputError(f"--hbm-reserve must be in [0, 1), got {self.hbm_reserve}")
        if self.chunk_tokens < 1:
            raise InputError("chunk_tokens must be positive")
        if not self.placements:
            raise InputError("--placements: give at least one policy")


@dataclass(frozen=True)
class Variant:
    """One column of the replay: a fitted placement and how tokens form steps."""

    label: str
    placement: Placement
    tokens_per_step: int
    redundant_experts: int
    phase: int = -1  # -1: every scored token; PHASE_PREFILL / PHASE_DECODE: only that phase's (plan splits them)


# ---------------------------------------------------------------------------------------------- fitting


@dataclass
class FitStatistics:
    """Counts over the fit part. load [L, E]; coselection [L, E, E] or None; score_start: first scored token."""

    load: np.ndarray
    coselection: np.ndarray | None
    fit_tokens: int
    score_start: int


def fit_statistics(trace: Trace, *, fit_fraction: float, phase: str, tokens_per_step: int, with_coselection: bool,
                   chunk_tokens: int = DEFAULT_CHUNK_TOKENS) -> FitStatistics:
    """Load (and co-selection) over the first fit_fraction of the trace's tokens.

    The scored part starts at the first recorded step boundary at or after that point (so no step is split
    between fitting and scoring); with fit_fraction 0 the whole trace is both fitted and scored.
    """
    meta = trace.metadata
    layers, experts = meta.num_moe_layers, meta.num_experts
    load = np.zeros((layers, experts), dtype=np.int64)
    cosel = np.zeros((layers, experts, experts) if with_coselection else (1, 1, 1), dtype=np.int64)
    total = trace.num_tokens
    if fit_fraction <= 0:
        stop = total
        score_start = 0
    else:
        stop = fit_stop(trace, fit_fraction, phase, chunk_tokens)
        score_start = -1
    t0 = 0
    last_step = None
    for chunk in trace.iter_chunks(("expert_ids", "step", "phase"), chunk_tokens):
        n = chunk.num_tokens
        assert chunk.expert_ids is not None and chunk.step is not None and chunk.phase is not None
        if t0 < stop:
            K.count_load(chunk.expert_ids, chunk.phase, t0, PHASES[phase], stop, load, cosel, with_coselection)
        if score_start < 0 and t0 + n > stop:
            # first boundary of recorded steps at or after `stop` (regrouped steps start anywhere)
            local = max(0, stop - t0)
            if tokens_per_step > 0 or local == 0 and (last_step is None or chunk.step[0] != last_step):
                score_start = t0 + local
            else:
                prev = chunk.step[local - 1] if local > 0 else last_step
                change = np.flatnonzero(chunk.step[local:] != prev)
                if change.size:
                    score_start = t0 + local + int(change[0])
        last_step = chunk.step[-1] if n else last_step
        t0 += n
        if score_start >= 0 and t0 >= stop:
            break
    if score_start < 0:
        score_start = total
    if fit_fraction > 0 and load.sum() == 0:
        raise InputError(f"{trace.paths[0]}: the fit part (the first {stop:,} tokens) holds no {phase} assignments "
                         "to fit placements on (raise --fit-fraction, or 0 to fit on everything)")
    return FitStatistics(load, cosel if with_coselection else None, stop, score_start)


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
                 gpus_per_node: int, redundant_experts: int, tokens_per_step: int) -> list[Variant]:
    out = []
    for policy in policies:
        placement = fit_placement(policy, stats.load, num_gpus=num_gpus, gpus_per_node=gpus_per_node,
                                  redundant_experts=redundant_experts, coselection=stats.coselection)
        check_placement_matches(placement, meta, policy)
        r = int((placement.slots >= 0).sum() // placement.num_layers - meta.num_experts)  # empty slots are no replicas
        label = policy if r == 0 or policy.startswith("file:") else f"{policy}+{r}"
        out.append(Variant(label, placement, tokens_per_step, max(r, 0)))
    return out


def check_placement_matches(placement: Placement, meta: TraceMetadata, source: str) -> None:
    """A placement must be for the trace's model: same layers and experts, and the same model id if it names one."""
    if placement.model_id is not None and placement.model_id != meta.model_id:
        raise InputError(f"{source}: placement is for model {placement.model_id!r} but the trace is from "
                         f"{meta.model_id!r}")
    if placement.num_experts != meta.num_experts or placement.num_layers != meta.num_moe_layers:
        raise InputError(
            f"{source}: placement is for {placement.num_layers} layers x {placement.num_experts} experts but the "
            f"trace ({meta.model_id}) has {meta.num_moe_layers} x {meta.num_experts}"
        )


# ---------------------------------------------------------------------------------------------- streaming


@dataclass
class VariantArrays:
    """Variants flattened for the kernels (padded to the largest G, S, replica count)."""

    gpus: np.ndarray
    slots: np.ndarray
    gpn: np.ndarray
    tps: np.ndarray
    used: np.ndarray
    phase: np.ndarray  # [V] -1 or the one phase a variant scores
    rep_count: np.ndarray  # [V, L, E]
    rep_slot: np.ndarray  # [V, L, E, R]
    local_slot: np.ndarray  # [V, L, E, G] slot of expert e on GPU g, -1 if none
    slot_gpu: np.ndarray  # [V, M] GPU of each slot
    g_max: int
    width: int

    @classmethod
    def build(cls, variants: list[Variant], num_experts: int) -> VariantArrays:
        n = len(variants)
        layers = variants[0].placement.num_layers
        g_max = max(v.placement.num_gpus for v in variants)
        r_max = max(int(v.placement.replica_counts.max()) for v in variants)
        width = max(v.placement.num_gpus * v.placement.slots_per_gpu + 4 * v.placement.num_gpus for v in variants)
        rep_count = np.zeros((n, layers, num_experts), dtype=np.int64)
        rep_slot = np.zeros((n, layers, num_experts, r_max), dtype=np.int64)
        local_slot = -np.ones((n, layers, num_experts, g_max), dtype=np.int64)
        m_max = max(v.placement.num_gpus * v.placement.slots_per_gpu for v in variants)
        slot_gpu = np.zeros((n, m_max), dtype=np.int64)
        for i, v in enumerate(variants):
            s_count = v.placement.slots_per_gpu
            flat = v.placement.slots.reshape(layers, -1)  # [L, G*S], slot index = gpu * S + s
            slot_gpu[i, : flat.shape[1]] = np.arange(flat.shape[1]) // s_count
            for layer in range(layers):
                for slot, e in enumerate(flat[layer].tolist()):
                    if e >= 0:
                        rep_slot[i, layer, e, rep_count[i, layer, e]] = slot
                        rep_count[i, layer, e] += 1
                        local_slot[i, layer, e, slot // s_count] = slot
        return cls(
            gpus=np.array([v.placement.num_gpus for v in variants], dtype=np.int64),
            slots=np.array([v.placement.slots_per_gpu for v in variants], dtype=np.int64),
            gpn=np.array([min(v.placement.gpus_per_node, v.placement.num_gpus) for v in variants], dtype=np.int64),
            tps=np.array([v.tokens_per_step for v in variants], dtype=np.int64),
            used=np.array([int((v.placement.slots[0] >= 0).sum()) for v in variants], dtype=np.int64),
            phase=np.array([v.phase for v in variants], dtype=np.int64),
            rep_count=rep_count, rep_slot=rep_slot, local_slot=local_slot, slot_gpu=slot_gpu, g_max=g_max,
            width=width,
        )


@dataclass
class Segment:
    """Everything one pass over a contiguous range of tokens produced; `merge` joins consecutive segments exactly.

    Per variant: an unpriced head step (the segment's first; it may continue the previous segment's last step), the
    priced steps after it, and the still-open tail step. Totals are plain sums. To replay shards in parallel, start
    each shard's segment with `sel_offset` = the scored tokens per phase before it (only regrouped steps,
    --tokens-per-step, depend on it; a cheap count over the phase column gives it) and merge them in order.
    """

    arrays: VariantArrays
    model: np.ndarray
    cost: np.ndarray
    layers: int
    sel_count: np.ndarray  # [2]
    cur_key: np.ndarray
    cur_ntok: np.ndarray
    acc: np.ndarray  # [V, L, W]
    fresh: np.ndarray
    head_key: np.ndarray
    head_ntok: np.ndarray
    head_acc: np.ndarray
    tot_gpu: np.ndarray  # [V, L, G]
    tot_int: np.ndarray  # [V, L, 8]
    comp: np.ndarray  # [V, H, L, 4]
    step_imb: list[list[np.ndarray]]  # per variant, arrays of priced steps in order
    step_time: list[list[np.ndarray]]  # per variant, arrays [H, n]
    step_ntok: list[list[np.ndarray]]

    @classmethod
    def empty(cls, arrays: VariantArrays, model: np.ndarray, cost: np.ndarray, layers: int,
              sel_offset: tuple[int, int] = (0, 0)) -> Segment:
        v, w, h = arrays.gpus.size, arrays.width, cost.shape[0]
        return cls(
            arrays=arrays, model=model, cost=cost, layers=layers,
            sel_count=np.array(sel_offset, dtype=np.int64),
            cur_key=np.full(v, np.iinfo(np.int64).min, dtype=np.int64), cur_ntok=np.zeros(v, dtype=np.int64),
            acc=np.zeros((v, layers, w), dtype=np.int64), fresh=np.ones(v, dtype=np.int64),
            head_key=np.zeros(v, dtype=np.int64), head_ntok=np.zeros(v, dtype=np.int64),
            head_acc=np.zeros((v, layers, w), dtype=np.int64),
            tot_gpu=np.zeros((v, layers, arrays.g_max), dtype=np.int64),
            tot_int=np.zeros((v, layers, K.NUM_INT_TOTALS), dtype=np.int64),
            comp=np.zeros((v, h, layers, len(K.COMPONENTS))),
            step_imb=[[] for _ in range(v)], step_time=[[] for _ in range(v)], step_ntok=[[] for _ in range(v)],
        )

    def feed(self, ids: np.ndarray, steps: np.ndarray, phases: np.ndarray, t0: int, phase_filter: int,
             score_start: int) -> None:
        """Route one chunk (global index of its first token t0) through the kernels."""
        a = self.arrays
        v, h, cap = a.gpus.size, self.cost.shape[0], ids.shape[0] + 1
        out_imb = np.empty((v, cap))
        out_time = np.empty((v, h, cap))
        out_ntok = np.empty((v, cap), dtype=np.int64)
        out_n = np.zeros(v, dtype=np.int64)
        K.replay_chunk(ids, steps.astype(np.int64, copy=False), phases, t0, phase_filter, score_start,
                       a.gpus, a.slots, a.gpn, a.tps, a.used, a.phase, a.rep_count, a.rep_slot, a.local_slot,
                       a.slot_gpu, self.model, self.cost,
                       self.sel_count, self.cur_key, self.cur_ntok, self.acc, self.fresh, self.head_key,
                       self.head_ntok, self.head_acc, self.tot_gpu, self.tot_int, self.comp,
                       out_imb, out_time, out_ntok, out_n)
        for i in range(v):
            n = int(out_n[i])
            if n:
                self.step_imb[i].append(out_imb[i, :n].copy())
                self.step_time[i].append(out_time[i, :, :n].copy())
                self.step_ntok[i].append(out_ntok[i, :n].copy())

    def _price(self, i: int, acc: np.ndarray, ntok: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        a = self.arrays
        t = np.zeros(self.cost.shape[0])
        imb = K.price_step(acc, ntok, int(a.gpus[i]), int(a.slots[i]), int(a.gpn[i]), int(a.used[i]),
                           self.model, self.cost, self.comp[i], self.tot_int[i], self.tot_gpu[i], t)
        return np.array([imb]), t[:, None], np.array([ntok], dtype=np.int64)

    def _append(self, i: int, priced: tuple[np.ndarray, np.ndarray, np.ndarray], front: bool = False) -> None:
        lists = (self.step_imb[i], self.step_time[i], self.step_ntok[i])
        for lst, arr in zip(lists, priced, strict=True):
            if front:
                lst.insert(0, arr)
            else:
                lst.append(arr)

    def merge(self, later: Segment) -> Segment:
        """This segment followed by `later` (which started fresh at the next token), as if replayed in one pass."""
        out = self
        out.tot_gpu += later.tot_gpu
        out.tot_int += later.tot_int
        out.comp += later.comp
        out.sel_count = later.sel_count.copy()
        for i in range(self.arrays.gpus.size):
            later_has_head = not later.fresh[i]
            # the step `later` opened with: its head if it closed one, else its open tail
            first_key = later.head_key[i] if later_has_head else later.cur_key[i]
            first_ntok = later.head_ntok[i] if later_has_head else later.cur_ntok[i]
            first_acc = later.head_acc[i] if later_has_head else later.acc[i]
            if first_ntok == 0:
                continue  # nothing scored in `later` for this variant
            if out.cur_ntok[i] > 0 and out.cur_key[i] == first_key:
                joined_acc = out.acc[i] + first_acc
                joined_ntok = out.cur_ntok[i] + first_ntok
            else:
                if out.cur_ntok[i] > 0:
                    self._close(out, i)
                joined_acc, joined_ntok = first_acc.copy(), first_ntok
            if later_has_head:
                out.cur_key[i], out.cur_ntok[i], out.acc[i] = first_key, joined_ntok, joined_acc
                self._close(out, i)
                for lst, extra in ((out.step_imb, later.step_imb), (out.step_time, later.step_time),
                                   (out.step_ntok, later.step_ntok)):
                    lst[i].extend(extra[i])
                out.cur_key[i], out.cur_ntok[i] = later.cur_key[i], later.cur_ntok[i]
                out.acc[i] = later.acc[i]
            else:
                out.cur_key[i], out.cur_ntok[i], out.acc[i] = first_key, joined_ntok, joined_acc
        return out

    def _close(self, seg: Segment, i: int) -> None:
        """Close seg's open step of variant i: it becomes the head if seg has none yet, else it is priced."""
        if seg.fresh[i]:
            seg.head_key[i], seg.head_ntok[i] = seg.cur_key[i], seg.cur_ntok[i]
            seg.head_acc[i] = seg.acc[i]
            seg.fresh[i] = 0
        else:
            seg._append(i, seg._price(i, seg.acc[i], int(seg.cur_ntok[i])))
        seg.cur_ntok[i] = 0
        seg.acc[i] = 0

    def finish(self) -> None:
        """No segment follows: price the head (in front) and the open tail."""
        for i in range(self.arrays.gpus.size):
            if not self.fresh[i] and self.head_ntok[i] > 0:
                self._append(i, self._price(i, self.head_acc[i], int(self.head_ntok[i])), front=True)
                self.head_ntok[i] = 0
            if self.cur_ntok[i] > 0:
                self._append(i, self._price(i, self.acc[i], int(self.cur_ntok[i])))
                self.cur_ntok[i] = 0
                self.acc[i] = 0

    def series(self, i: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Per-step imbalance [n], step time [H, n], tokens [n] of variant i, in step order."""
        h = self.cost.shape[0]
        imb = np.concatenate(self.step_imb[i]) if self.step_imb[i] else np.zeros(0)
        tim = np.concatenate(self.step_time[i], axis=1) if self.step_time[i] else np.zeros((h, 0))
        ntok = np.concatenate(self.step_ntok[i]) if self.step_ntok[i] else np.zeros(0, dtype=np.int64)
        return imb, tim, ntok


def run_variants(trace: Trace, variants: list[Variant], gpus: list[GpuSpec], *, phase: str, score_start: int,
                 capacity_factor: float | None, chunk_tokens: int = DEFAULT_CHUNK_TOKENS,
                 progress: Progress | None = None) -> Segment:
    """One pass over the scored tokens for every variant; returns the finished segment."""
    meta = trace.metadata
    arrays = VariantArrays.build(variants, meta.num_experts)
    seg = Segment.empty(arrays, model_vector(meta, capacity_factor), cost_matrix(gpus, meta), meta.num_moe_layers)
    t0 = 0
    for chunk in trace.iter_chunks(("expert_ids", "step", "phase"), chunk_tokens):
        n = chunk.num_tokens
        if t0 + n > score_start:
            assert chunk.expert_ids is not None and chunk.step is not None and chunk.phase is not None
            seg.feed(chunk.expert_ids, chunk.step, chunk.phase, t0, PHASES[phase], score_start)
        t0 += n
        if progress is not None:
            progress(n)
    seg.finish()
    return seg


def split_phases(variants: list[Variant], split: bool) -> tuple[list[Variant], list[tuple[int, ...]]]:
    """Kernel variants for `variants`: with `split` (regrouped steps over both phases), each one twice, scoring
    prefill and decode tokens apart, so that every step holds one phase's tokens only and a phase switch in the
    trace never cuts a step short (as plan does). Returns the members and each variant's member indices."""
    if not split:
        return variants, [(i,) for i in range(len(variants))]
    members = [dataclasses.replace(v, phase=p) for v in variants for p in (PHASE_PREFILL, PHASE_DECODE)]
    return members, [(2 * i, 2 * i + 1) for i in range(len(variants))]


def merge_groups(seg: Segment, groups: list[tuple[int, ...]]) -> Segment:
    """A segment with one row per group of kernel variants: their totals summed, their steps concatenated in member
    order (prefill steps, then decode steps when split by phase)."""
    if all(len(g) == 1 for g in groups) and [g[0] for g in groups] == list(range(len(groups))):
        return seg

    def rows(a: np.ndarray) -> np.ndarray:
        return np.stack([a[list(g)].sum(axis=0) for g in groups])

    def steps(lists: list[list[np.ndarray]]) -> list[list[np.ndarray]]:
        return [[arr for i in g for arr in lists[i]] for g in groups]

    return dataclasses.replace(seg, tot_gpu=rows(seg.tot_gpu), tot_int=rows(seg.tot_int), comp=rows(seg.comp),
                               step_imb=steps(seg.step_imb), step_time=steps(seg.step_time),
                               step_ntok=steps(seg.step_ntok))


# ---------------------------------------------------------------------------------------------- results


def _pcts(x: np.ndarray) -> dict[str, float]:
    if x.size == 0:
        return {"p50": float("nan"), "p95": float("nan"), "p99": float("nan"), "mean": float("nan")}
    p = np.percentile(x, [50, 95, 99])
    return {"p50": float(p[0]), "p95": float(p[1]), "p99": float(p[2]), "mean": float(x.mean())}


def _step_tokens(ntok: np.ndarray) -> dict[str, float]:
    if ntok.size == 0:
        return {"mean": 0.0, "min": 0.0, "max": 0.0}
    return {"mean": float(ntok.mean()), "min": float(ntok.min()), "max": float(ntok.max())}


@dataclass
class HardwareTiming:
    """Predicted MoE time of one variant on one GPU type; seconds per step (means over the scored steps)."""

    hardware: str
    step_time: dict[str, float]  # p50 / p95 / p99 / mean seconds
    breakdown: dict[str, float]  # mean seconds per step: compute, weights, dispatch, combine
    tokens_per_s_per_gpu: float  # scored tokens / summed step time / G (MoE layers only)
    expert_memory_bytes: float  # routed expert weights per GPU
    hbm_bytes: float
    expert_memory_share: float  # of HBM
    expert_memory_fits: bool  # expert weights <= HBM x (1 - hbm_reserve); plan adds the non-expert weights
    per_layer: list[dict[str, float]]  # mean seconds per step per component, per layer
    # what priced it: expert_time ("measured profile ...", "extrapolated ...", "roofline (uncalibrated)"),
    # non_expert_time and all_to_all (cost_model.Pricing.to_dict)
    priced_by: dict[str, str] = field(default_factory=dict)


@dataclass
class VariantSummary:
    """What one placement scored on the scored tokens."""

    label: str
    policy: str
    num_gpus: int
    gpus_per_node: int
    slots_per_gpu: int
    redundant_experts: int
    tokens_per_step: int
    tokens: int
    steps: int
    step_tokens: dict[str, float]  # tokens per scored step: mean / min / max
    assignments: int
    step_imbalance: float  # the headline (simulator.metrics): per-step busiest over mean GPU load, token-weighted
    aggregate_imbalance: float  # the same with the whole scored part as one step (simulator.metrics)
    step_imbalance_percentiles: dict[str, float]  # of each step's own ratio: p50 / p95 / p99 / mean
    leave_gpu_share: float  # assignments served by another GPU than the token's source
    leave_node_share: float  # assignments served on another node
    scale_up_bytes_per_step: float  # dispatch + combine bytes over NVLink-class links
    scale_out_bytes_per_step: float  # dispatch + combine bytes over the network
    dropped_assignments: int
    dropped_share: float
    expert_flops_per_step: float  # kept assignments x FLOPs per assignment, all GPUs
    weight_bytes_read_per_step: float  # experts with work x expert bytes, all GPUs
    timings: list[HardwareTiming]
    per_layer: list[dict[str, float]]
    step_imbalance_series: list[float] = field(repr=False, default_factory=list)
    step_time_series: list[list[float]] = field(repr=False, default_factory=list)  # [H][steps] seconds

    @property
    def all_to_all_bytes_per_step(self) -> float:
        return self.scale_up_bytes_per_step + self.scale_out_bytes_per_step


def summarise(seg: Segment, variants: list[Variant], gpus: list[GpuSpec], meta: TraceMetadata,
              keep_series: bool = True, hbm_reserve: float = DEFAULT_HBM_RESERVE) -> list[VariantSummary]:
    out = []
    per_copy = seg.model[K.M_DISPATCH_BYTES] + seg.model[K.M_COMBINE_BYTES]
    ebytes = expert_weight_bytes(meta, BF16_BYTES)
    for i, v in enumerate(variants):
        p = v.placement
        g = p.num_gpus
        tot_gpu = seg.tot_gpu[i, :, :g].astype(np.float64)  # [L, G]
        ti = seg.tot_int[i]  # [L, 8]
        imb, tim, ntok = seg.series(i)
        steps = int(imb.size)
        tokens = int(ntok.sum())
        assignments = int(tot_gpu.sum())
        mem = float(sum(int((p.slots[layer] >= 0).sum(axis=1).max()) for layer in range(p.num_layers)) * ebytes)
        timings = []
        for h, gpu in enumerate(gpus):
            comp = seg.comp[i, h]  # [L, 4]
            total_time = float(tim[h].sum())
            per_step = comp.sum(axis=0) / max(steps, 1)
            timings.append(HardwareTiming(
                hardware=gpu.name,
                step_time=_pcts(tim[h]),
                breakdown=dict(zip(K.COMPONENTS, map(float, per_step), strict=True)),
                tokens_per_s_per_gpu=tokens / total_time / g if total_time > 0 else float("nan"),
                expert_memory_bytes=mem, hbm_bytes=gpu.hbm_bytes, expert_memory_share=mem / gpu.hbm_bytes,
                expert_memory_fits=mem <= gpu.hbm_bytes * (1 - hbm_reserve),
                per_layer=[dict(zip(K.COMPONENTS, map(float, comp[layer] / max(steps, 1)), strict=True))
                           for layer in range(p.num_layers)],
                priced_by=pricing_for(gpu, meta).to_dict(),
            ))
        per_layer = []
        for layer in range(p.num_layers):
            a = tot_gpu[layer]
            n_assign = a.sum()
            per_layer.append({
                "step_imbalance": metrics.ratio(float(ti[layer, K.I_PEAK]), float(a.mean())),
                "aggregate_imbalance": metrics.aggregate_imbalance(a[None, :]),
                "leave_gpu_share": float(ti[layer, K.I_LEAVE_GPU] / n_assign) if n_assign else 0.0,
                "leave_node_share": float(ti[layer, K.I_LEAVE_NODE] / n_assign) if n_assign else 0.0,
                "scale_up_bytes_per_step": float(ti[layer, K.I_SU_PAIRS] * per_copy / max(steps, 1)),
                "scale_out_bytes_per_step": float(ti[layer, K.I_SO_PAIRS] * per_copy / max(steps, 1)),
                "dropped_assignments": int(ti[layer, K.I_DROPPED]),
                "weight_bytes_read_per_step": float(ti[layer, K.I_ACTIVE] * ebytes / max(steps, 1)),
            })
        dropped = int(ti[:, K.I_DROPPED].sum())
        out.append(VariantSummary(
            label=v.label, policy=p.policy, num_gpus=g, gpus_per_node=p.gpus_per_node,
            slots_per_gpu=p.slots_per_gpu, redundant_experts=v.redundant_experts, tokens_per_step=v.tokens_per_step,
            tokens=tokens, steps=steps, step_tokens=_step_tokens(ntok), assignments=assignments,
            step_imbalance=metrics.ratio(float(ti[:, K.I_PEAK].sum()), float(tot_gpu.mean(axis=1).sum())),
            aggregate_imbalance=metrics.aggregate_imbalance(tot_gpu), step_imbalance_percentiles=_pcts(imb),
            leave_gpu_share=float(ti[:, K.I_LEAVE_GPU].sum() / assignments) if assignments else 0.0,
            leave_node_share=float(ti[:, K.I_LEAVE_NODE].sum() / assignments) if assignments else 0.0,
            scale_up_bytes_per_step=float(ti[:, K.I_SU_PAIRS].sum() * per_copy / max(steps, 1)),
            scale_out_bytes_per_step=float(ti[:, K.I_SO_PAIRS].sum() * per_copy / max(steps, 1)),
            dropped_assignments=dropped, dropped_share=dropped / assignments if assignments else 0.0,
            expert_flops_per_step=(assignments - dropped) * seg.model[K.M_FLOPS] / max(steps, 1),
            weight_bytes_read_per_step=float(ti[:, K.I_ACTIVE].sum() * ebytes / max(steps, 1)),
            timings=timings, per_layer=per_layer,
            step_imbalance_series=imb.tolist() if keep_series else [],
            step_time_series=tim.tolist() if keep_series else [],
        ))
    return out


@dataclass
class ReplayResult:
    """Per-placement summaries of one replay, plus what was replayed."""

    trace: list[str]
    metadata: dict[str, Any]
    config: dict[str, Any]
    fit_tokens: int
    score_start: int
    total_tokens: int
    placements: list[VariantSummary]
    fitted_placements: list[Placement] = field(repr=False, default_factory=list)
    fit_load: np.ndarray | None = field(repr=False, default=None)  # [L, E] load the placements were fitted on

    def to_dict(self) -> dict[str, Any]:
        return {
            "trace": self.trace,
            "metadata": self.metadata,
            "config": self.config,
            "fit_tokens": self.fit_tokens,
            "score_start": self.score_start,
            "total_tokens": self.total_tokens,
            "placements": [dataclasses.asdict(s) | {"all_to_all_bytes_per_step": s.all_to_all_bytes_per_step}
                           for s in self.placements],
        }


def replay(trace: Trace, config: ReplayConfig, progress: Progress | None = None) -> ReplayResult:
    """Fit every placement in config on the fit part of the trace and score them all in one pass over the rest."""
    meta = trace.metadata
    if trace.num_tokens == 0:
        raise InputError(f"{trace.paths[0]}: trace has no tokens")
    stats = fit_statistics(
        trace, fit_fraction=config.fit_fraction, phase=config.phase, tokens_per_step=config.tokens_per_step,
        with_coselection=any(p in NEEDS_COSELECTION for p in config.placements), chunk_tokens=config.chunk_tokens,
    )
    if stats.score_start >= trace.num_tokens:
        raise InputError(f"{trace.paths[0]}: nothing left to score after fitting on {stats.fit_tokens} tokens "
                         "(lower --fit-fraction)")
    variants = fit_variants(stats, meta, policies=tuple(config.placements), num_gpus=config.num_gpus,
                            gpus_per_node=config.gpus_per_node, redundant_experts=config.redundant_experts,
                            tokens_per_step=config.tokens_per_step)
    members, groups = split_phases(variants, config.tokens_per_step > 0 and config.phase == "all")
    seg = run_variants(trace, members, [config.hardware], phase=config.phase, score_start=stats.score_start,
                       capacity_factor=config.capacity_factor, chunk_tokens=config.chunk_tokens, progress=progress)
    seg = merge_groups(seg, groups)
    summaries = summarise(seg, variants, [config.hardware], meta, hbm_reserve=config.hbm_reserve)
    if summaries and summaries[0].tokens == 0:
        raise InputError(f"{trace.paths[0]}: no {config.phase} tokens to score")
    cfg = dataclasses.asdict(config) | {"hardware": config.hardware.to_dict(), "placements": list(config.placements)}
    return ReplayResult(
        trace=[str(p) for p in trace.paths], metadata=meta.to_dict(), config=cfg, fit_tokens=stats.fit_tokens,
        score_start=stats.score_start, total_tokens=trace.num_tokens, placements=summaries,
        fitted_placements=[v.placement for v in variants], fit_load=stats.load,
    )
