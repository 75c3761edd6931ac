"""Kernel-state plumbing: variants flattened into arrays for the kernels, and the Segment a pass over a range
of tokens fills (mergeable exactly with the next segment's), and the one-pass driver over a trace.

Shape legend: V variants, L MoE layers, E experts, G GPUs (padded to the largest), S slots per GPU, M = G x S
slots, R replicas (padded to the most), H hardware specs, W accumulator width (kernels.py), n priced steps.
"""

from __future__ import annotations

import dataclasses
from collections import deque
from collections.abc import Iterable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Self

import numpy as np

from simulator import kernels as K
from simulator.cost_model import cost_matrix, model_vector
from simulator.hardware import GpuSpec
from simulator.options import DISPATCH_POLICIES, PHASES
from simulator.replay.config import Progress, Variant
from traces.chunk import TraceChunk, numbered
from traces.reader import DEFAULT_CHUNK_TOKENS, Trace
from traces.schema import PHASE_DECODE, PHASE_PREFILL

if TYPE_CHECKING:
    from simulator.cluster import Cluster

FIELDS = ("expert_ids", "step", "phase")  # the columns a replay reads


@dataclass
class VariantArrays:
    """Variants flattened for the kernels (padded to the largest G, S, replica count)."""

    gpus: np.ndarray  # [V] GPUs of each variant
    slots: np.ndarray  # [V] slots per GPU
    gpn: np.ndarray  # [V] GPUs per node (at most the GPU count)
    tokens_per_step: np.ndarray  # [V] 0: recorded steps
    used: np.ndarray  # [V] slots holding an expert (layer 0)
    phase: np.ndarray  # [V] -1 or the one phase a variant scores
    rep_count: np.ndarray  # [V, L, E] replicas of each expert
    rep_slot: np.ndarray  # [V, L, E, R] slot of each replica
    local_slot: np.ndarray  # [V, L, E, G] slot of expert e on GPU g, -1 if none
    slot_gpu: np.ndarray  # [V, M] GPU of each slot
    g_max: int  # largest G
    width: int  # W, accumulator entries per layer (slots + traffic counters)

    @classmethod
    def build(cls, variants: list[Variant], num_experts: int) -> VariantArrays:
        n = len(variants)
        layers = variants[0].placement.num_layers
        g_max = max(v.placement.num_gpus for v in variants)
        r_max = max(int(v.placement.replica_counts.max()) for v in variants)
        width = max(v.placement.num_gpus * v.placement.slots_per_gpu + 4 * v.placement.num_gpus
                    for v in variants)
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
            gpn=np.array([min(v.placement.gpus_per_node, v.placement.num_gpus) for v in variants],
                         dtype=np.int64),
            tokens_per_step=np.array([v.tokens_per_step for v in variants], dtype=np.int64),
            used=np.array([int((v.placement.slots[0] >= 0).sum()) for v in variants], dtype=np.int64),
            phase=np.array([v.phase for v in variants], dtype=np.int64),
            rep_count=rep_count, rep_slot=rep_slot, local_slot=local_slot, slot_gpu=slot_gpu, g_max=g_max,
            width=width,
        )


@dataclass
class Segment:
    """Everything one pass over a contiguous range of tokens produced; `absorb` joins consecutive segments
    exactly.

    Per variant: an unpriced head step (the segment's first; it may continue the previous segment's last
    step), the priced steps after it, and the still-open tail step. Totals are plain sums. To replay shards in
    parallel, start each shard's segment with `sel_offset` = the scored tokens per phase before it (only
    regrouped steps, --tokens-per-step, depend on it; a cheap count over the phase column gives it) and absorb
    them in order.
    """

    arrays: VariantArrays
    model: np.ndarray  # [6] per-model entries (kernels.M_*)
    cost: np.ndarray  # [H, C] cost rows (kernels.C_*)
    layers: int  # L
    sel_count: np.ndarray  # [2] scored tokens so far per phase (prefill, decode)
    cur_key: np.ndarray  # [V] key of the open (tail) step
    cur_ntok: np.ndarray  # [V] tokens in the open step
    acc: np.ndarray  # [V, L, W] the open step's counts
    fresh: np.ndarray  # [V] 1 while no step has closed yet (the head is still open)
    head_key: np.ndarray  # [V] key of the head step
    head_ntok: np.ndarray  # [V] tokens in the head step
    head_acc: np.ndarray  # [V, L, W] the head step's counts (priced by finish or by the segment before)
    tot_gpu: np.ndarray  # [V, L, G] assignments per GPU over priced steps
    tot_int: np.ndarray  # [V, L, 8] integer totals (kernels.I_*)
    comp: np.ndarray  # [V, H, L, 4] seconds per time component (kernels.COMPONENTS)
    step_imb: list[list[np.ndarray]]  # per variant, [n] arrays of each priced step's imbalance, in order
    step_sglang: list[list[np.ndarray]]  # per variant, [n] arrays: sum over layers of SGLang's balancedness
    step_time: list[list[np.ndarray]]  # per variant, [H, n] arrays of step seconds
    step_ntok: list[list[np.ndarray]]  # per variant, [n] arrays of tokens per step

    @classmethod
    def empty(cls, arrays: VariantArrays, model: np.ndarray, cost: np.ndarray, layers: int,
              sel_offset: tuple[int, int] = (0, 0)) -> Self:
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
            step_imb=[[] for _ in range(v)], step_sglang=[[] for _ in range(v)],
            step_time=[[] for _ in range(v)], step_ntok=[[] for _ in range(v)],
        )

    def state(self) -> dict[str, Any]:
        """Everything but the inputs all segments of a pass share (variant arrays, model and cost rows): what
        a cluster worker sends back for from_state to rebuild, bit for bit."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name not in _SHARED}

    @classmethod
    def from_state(cls, arrays: VariantArrays, model: np.ndarray, cost: np.ndarray,
                   state: dict[str, Any]) -> Segment:
        return cls(arrays=arrays, model=model, cost=cost, **state)

    def feed_chunks(self, chunks: Iterable[tuple[int, TraceChunk]], phase_filter: int,
                    score_start: int) -> None:
        """feed() every (global index of its first token, chunk)."""
        for t0, chunk in chunks:
            assert chunk.expert_ids is not None and chunk.step is not None and chunk.phase is not None
            self.feed(chunk.expert_ids, chunk.step, chunk.phase, t0, phase_filter, score_start)

    def feed(self, ids: np.ndarray, steps: np.ndarray, phases: np.ndarray, t0: int, phase_filter: int,
             score_start: int) -> None:
        """Route one chunk (global index of its first token t0) through the kernels."""
        a = self.arrays
        outputs = self._step_outputs(ids.shape[0] + 1)
        K.replay_chunk(ids, steps.astype(np.int64, copy=False), phases, t0, phase_filter, score_start,
                       a.gpus, a.slots, a.gpn, a.tokens_per_step, a.used, a.phase, a.rep_count, a.rep_slot,
                       a.local_slot, a.slot_gpu, self.model, self.cost,
                       self.sel_count, self.cur_key, self.cur_ntok, self.acc, self.fresh, self.head_key,
                       self.head_ntok, self.head_acc, self.tot_gpu, self.tot_int, self.comp, *outputs)
        self._keep_steps(*outputs)

    def _step_outputs(self, cap: int) -> tuple[np.ndarray, ...]:
        """The kernels' per-step outputs for up to `cap` closed steps per variant: imbalance [V, cap], SGLang
        balancedness summed over layers [V, cap], seconds [V, H, cap], tokens [V, cap], and how many closed
        [V]."""
        v, h = self.arrays.gpus.size, self.cost.shape[0]
        return (np.empty((v, cap)), np.empty((v, cap)), np.empty((v, h, cap)),
                np.empty((v, cap), dtype=np.int64), np.zeros(v, dtype=np.int64))

    def _keep_steps(self, out_imb: np.ndarray, out_sglang: np.ndarray, out_time: np.ndarray,
                    out_ntok: np.ndarray, out_n: np.ndarray) -> None:
        for i in range(self.arrays.gpus.size):
            n = int(out_n[i])
            if n:
                self.step_imb[i].append(out_imb[i, :n].copy())
                self.step_sglang[i].append(out_sglang[i, :n].copy())
                self.step_time[i].append(out_time[i, :, :n].copy())
                self.step_ntok[i].append(out_ntok[i, :n].copy())

    # The open (tail) and head steps' contents: the counts kernels.replay_chunk accumulates ([L, W] views).
    # A subclass that buffers tokens instead (dispatch.DispatchSegment) overrides these five.
    def _content(self, i: int, head: bool) -> Any:
        return (self.head_acc if head else self.acc)[i]

    def _join(self, first: Any, second: Any) -> Any:
        return first + second

    def _store(self, i: int, head: bool, content: Any) -> None:
        (self.head_acc if head else self.acc)[i] = content

    def _clear_tail(self, i: int) -> None:
        self.acc[i] = 0

    def _price(self, i: int, content: Any, ntok: int) -> tuple[np.ndarray, ...]:
        """Price one closed step of variant i: the _keep_steps series for it (imbalance, SGLang layer sum,
        seconds [H, 1], tokens), to _append."""
        a = self.arrays
        t = np.zeros(self.cost.shape[0])
        imb, sglang = K.price_step(content, ntok, int(a.gpus[i]), int(a.slots[i]), int(a.gpn[i]),
                                   int(a.used[i]), self.model, self.cost, self.comp[i], self.tot_int[i],
                                   self.tot_gpu[i], t)
        return step_series(imb, sglang, t, ntok)

    def _append(self, i: int, priced: tuple[np.ndarray, ...], front: bool = False) -> None:
        lists = (self.step_imb[i], self.step_sglang[i], self.step_time[i], self.step_ntok[i])
        for lst, arr in zip(lists, priced, strict=True):
            if front:
                lst.insert(0, arr)
            else:
                lst.append(arr)

    def absorb(self, later: Segment) -> None:
        """Extend this segment, in place, by `later` (which started fresh at the next token), as if the two
        had been replayed in one pass. `later` is left as it was; use only this segment afterwards."""
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
            if first_ntok == 0:
                continue  # nothing scored in `later` for this variant
            first = later._content(i, later_has_head)
            if out.cur_ntok[i] > 0 and out.cur_key[i] == first_key:
                joined = out._join(out._content(i, False), first)
                joined_ntok = out.cur_ntok[i] + first_ntok
            else:
                if out.cur_ntok[i] > 0:
                    self._close(out, i)
                joined, joined_ntok = first, first_ntok
            out.cur_key[i], out.cur_ntok[i] = first_key, joined_ntok
            out._store(i, False, joined)
            if later_has_head:
                self._close(out, i)
                for lst, extra in ((out.step_imb, later.step_imb), (out.step_sglang, later.step_sglang),
                                   (out.step_time, later.step_time), (out.step_ntok, later.step_ntok)):
                    lst[i].extend(extra[i])
                out.cur_key[i], out.cur_ntok[i] = later.cur_key[i], later.cur_ntok[i]
                out._store(i, False, later._content(i, False))

    def _close(self, seg: Segment, i: int) -> None:
        """Close seg's open step of variant i: it becomes the head if seg has none yet, else it is priced."""
        if seg.fresh[i]:
            seg.head_key[i], seg.head_ntok[i] = seg.cur_key[i], seg.cur_ntok[i]
            seg._store(i, True, seg._content(i, False))
            seg.fresh[i] = 0
        else:
            seg._append(i, seg._price(i, seg._content(i, False), int(seg.cur_ntok[i])))
        seg.cur_ntok[i] = 0
        seg._clear_tail(i)

    def finish(self) -> None:
        """No segment follows: price the head (in front) and the open tail."""
        for i in range(self.arrays.gpus.size):
            if not self.fresh[i] and self.head_ntok[i] > 0:
                self._append(i, self._price(i, self._content(i, True), int(self.head_ntok[i])), front=True)
                self.head_ntok[i] = 0
            if self.cur_ntok[i] > 0:
                self._append(i, self._price(i, self._content(i, False), int(self.cur_ntok[i])))
                self.cur_ntok[i] = 0
                self._clear_tail(i)

    def series(self, i: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Per-step imbalance [n], step time [H, n], tokens [n] of variant i, in step order."""
        h = self.cost.shape[0]
        imb = np.concatenate(self.step_imb[i]) if self.step_imb[i] else np.zeros(0)
        tim = np.concatenate(self.step_time[i], axis=1) if self.step_time[i] else np.zeros((h, 0))
        ntok = np.concatenate(self.step_ntok[i]) if self.step_ntok[i] else np.zeros(0, dtype=np.int64)
        return imb, tim, ntok

    def sglang_layer_sums(self, i: int) -> np.ndarray:
        """[n] each priced step's sum over layers of SGLang's balancedness (simulator.metrics), in step
        order."""
        return np.concatenate(self.step_sglang[i]) if self.step_sglang[i] else np.zeros(0)


_SHARED = ("arrays", "model", "cost")


def step_series(imb: float, sglang: float, seconds: np.ndarray, ntok: int) -> tuple[np.ndarray, ...]:
    """One priced step as the per-step series Segment keeps (step_imb, step_sglang, step_time, step_ntok)."""
    return np.array([imb]), np.array([sglang]), seconds[:, None], np.array([ntok], dtype=np.int64)


def new_segment(arrays: VariantArrays, model: np.ndarray, cost: np.ndarray, layers: int,
                sel_offset: tuple[int, int] = (0, 0), dispatch: str = "static") -> Segment:
    """An empty segment for the dispatch policy: Segment for static, else a DispatchSegment."""
    if dispatch == "static":
        return Segment.empty(arrays, model, cost, layers, sel_offset)
    from simulator.replay.dispatch import DispatchSegment

    return DispatchSegment.empty(arrays, model, cost, layers, sel_offset).start(
        DISPATCH_POLICIES.index(dispatch))


SHARD_TOKENS = 1 << 18  # tokens per independently replayed shard; fixed, so results never depend on --workers


def shard_ranges(num_tokens: int, score_start: int, chunk_tokens: int) -> list[tuple[int, int]]:
    """Token ranges [start, stop) of the shards run_variants replays apart: whole chunks from the one holding
    the first scored token, about SHARD_TOKENS tokens each. They depend on the trace alone."""
    first = score_start // chunk_tokens * chunk_tokens
    size = -(-SHARD_TOKENS // chunk_tokens) * chunk_tokens
    return [(start, min(start + size, num_tokens)) for start in range(first, num_tokens, size)]


def scored_phases(phase: np.ndarray, t0: int, score_start: int, phase_filter: int) -> np.ndarray:
    """[2] scored tokens per phase in a chunk whose first token is t0 (a token before score_start, or of a
    phase the filter drops, is not scored)."""
    ph = phase[max(0, score_start - t0):]
    if phase_filter >= 0:
        ph = ph[ph == phase_filter]
    return np.bincount(ph, minlength=2)[:2]


def run_variants(trace: Trace, variants: list[Variant], gpus: list[GpuSpec], *, phase: str, score_start: int,
                 capacity_factor: float | None, chunk_tokens: int = DEFAULT_CHUNK_TOKENS,
                 progress: Progress | None = None, cluster: Cluster | None = None,
                 dispatch: str = "static") -> Segment:
    """One pass over the scored tokens for every variant; returns the finished segment.

    The scored part is cut into shards (shard_ranges). Here, the trace is read once, in order, and each
    shard is replayed into its own Segment on a pool of kernels.workers() threads (the kernel releases the
    GIL); with a cluster, each worker reads and replays its shards itself (replay_range). Either way the
    segments are absorbed in trace order, exactly, with at most two shards per thread in flight, so memory
    stays bounded whatever the trace's length. The cut points depend only on the trace, so any worker count,
    and a cluster, give bit-identical results. `dispatch` names the replica dispatch policy
    (options.DISPATCH_POLICIES); static keeps the token-by-token kernel, the others route each step when it
    closes (replay.dispatch).
    """
    meta = trace.metadata
    arrays = VariantArrays.build(variants, meta.num_experts)
    model, cost = model_vector(meta, capacity_factor), cost_matrix(gpus, meta)
    phase_filter = PHASES[phase]
    ranges = shard_ranges(trace.num_tokens, score_start, chunk_tokens)
    if cluster is not None:
        from simulator.replay.distributed import run_on_cluster

        joined = run_on_cluster(cluster, trace, arrays, model, cost, ranges, phase_filter, score_start,
                                chunk_tokens, progress, dispatch)
        joined.finish()
        return joined

    def replay_shard(chunks: list[tuple[int, TraceChunk]], sel_offset: tuple[int, int]) -> Segment:
        seg = new_segment(arrays, model, cost, meta.num_moe_layers, sel_offset, dispatch)
        seg.feed_chunks(chunks, phase_filter, score_start)
        return seg

    threads = K.workers()
    merged: Segment | None = None
    in_flight: deque[Future[Segment]] = deque()
    scored = np.zeros(2, dtype=np.int64)  # scored tokens per phase before the shard being gathered

    def absorb_oldest() -> None:
        nonlocal merged
        seg = in_flight.popleft().result()
        if merged is None:
            merged = seg
        else:
            merged.absorb(seg)

    with ThreadPoolExecutor(max_workers=threads) as pool:
        shard: list[tuple[int, TraceChunk]] = []
        offset, shard_index = (0, 0), 0
        for t0, chunk in numbered(trace.iter_chunks(FIELDS, chunk_tokens), 0):
            n = chunk.num_tokens
            if t0 + n > score_start:
                assert chunk.phase is not None
                scored += scored_phases(chunk.phase, t0, score_start, phase_filter)
                shard.append((t0, chunk))
                if t0 + n >= ranges[shard_index][1]:
                    in_flight.append(pool.submit(replay_shard, shard, offset))
                    shard, offset, shard_index = [], (int(scored[0]), int(scored[1])), shard_index + 1
                while len(in_flight) > 2 * threads or (in_flight and in_flight[0].done()):
                    absorb_oldest()
            if progress is not None:
                progress(n)
        if shard or not in_flight:
            in_flight.append(pool.submit(replay_shard, shard, offset))
        while in_flight:
            absorb_oldest()
    assert merged is not None
    merged.finish()
    return merged


def split_phases(variants: list[Variant], split: bool) -> tuple[list[Variant], list[tuple[int, ...]]]:
    """Kernel variants for `variants`: with `split` (regrouped steps over both phases), each one twice,
    scoring prefill and decode tokens apart, so that every step holds one phase's tokens only and a phase
    switch in the trace never cuts a step short (as plan does). Returns the members and each variant's member
    indices."""
    if not split:
        return variants, [(i,) for i in range(len(variants))]
    members = [dataclasses.replace(v, phase=p) for v in variants for p in (PHASE_PREFILL, PHASE_DECODE)]
    return members, [(2 * i, 2 * i + 1) for i in range(len(variants))]


def merge_groups(seg: Segment, groups: list[tuple[int, ...]]) -> Segment:
    """A segment with one row per group of kernel variants: their totals summed, their steps concatenated in
    member order (prefill steps, then decode steps when split by phase)."""
    if all(len(g) == 1 for g in groups) and [g[0] for g in groups] == list(range(len(groups))):
        return seg

    def rows(a: np.ndarray) -> np.ndarray:
        return np.stack([a[list(g)].sum(axis=0) for g in groups])

    def steps(lists: list[list[np.ndarray]]) -> list[list[np.ndarray]]:
        return [[arr for i in g for arr in lists[i]] for g in groups]

    return dataclasses.replace(seg, tot_gpu=rows(seg.tot_gpu), tot_int=rows(seg.tot_int), comp=rows(seg.comp),
                               step_imb=steps(seg.step_imb), step_sglang=steps(seg.step_sglang),
                               step_time=steps(seg.step_time), step_ntok=steps(seg.step_ntok))


