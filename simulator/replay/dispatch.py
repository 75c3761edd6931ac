"""The Segment of a per-step dispatch policy (`--dispatch` other than static): each variant's open step and
unpriced head step are kept as tokens, not counts, because the split over replicas needs the whole step; they
are routed and priced when the step closes (dispatch_kernels). Segments still absorb each other exactly: a
step that straddles two segments is routed once, on all of its tokens.

Shape legend: V variants, L layers, K top-k, B buffered tokens over all variants (variant v at buf_off[v],
room for buf_cap[v]).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from simulator import dispatch_kernels as DK
from simulator.replay.segment import Segment, step_series

PIECE_TOKENS = 4096  # tokens per kernel call: bounds how far a recorded step's buffer grows past the step
FIRST_CAP = 1024  # first room per variant for recorded steps (regrouped steps get exactly their size)

Content = tuple[np.ndarray, np.ndarray | None]  # (global token indices [n], expert ids [n, L, K])


def _none() -> np.ndarray:
    return np.zeros(0, dtype=np.int64)


@dataclass
class DispatchSegment(Segment):
    """Segment whose steps are routed by dispatch policy `policy` (dispatch_kernels.P_*) when they close."""

    policy: int = DK.P_LEAST_LOADED
    buf_off: np.ndarray = field(default_factory=_none)  # [V]
    buf_cap: np.ndarray = field(default_factory=_none)  # [V]
    buf_tok: np.ndarray = field(default_factory=_none)  # [B] the open steps' token indices
    buf_ids: np.ndarray | None = None  # [B, L, K] their expert ids (allocated with the first tokens)
    head_tok: np.ndarray = field(default_factory=_none)  # [B] the head steps'
    head_ids: np.ndarray | None = None  # [B, L, K]

    def start(self, policy: int) -> DispatchSegment:
        """Set the policy and the first room per variant (call once, on an empty segment)."""
        self.policy = policy
        tps = self.arrays.tokens_per_step
        self.buf_cap = np.where(tps > 0, tps, FIRST_CAP).astype(np.int64)
        self.buf_off = np.concatenate([[0], np.cumsum(self.buf_cap)[:-1]]).astype(np.int64)
        self.buf_tok = np.zeros(int(self.buf_cap.sum()), dtype=np.int64)
        self.head_tok = np.zeros_like(self.buf_tok)
        return self

    def _make_room(self, need: np.ndarray, like: np.ndarray) -> None:
        """Room for need[v] tokens per variant in both buffers, keeping what they hold; `like` [n, L, K] gives
        the ids' dtype and shape."""
        if self.buf_ids is None:
            shape = (self.buf_tok.size, *like.shape[1:])
            self.buf_ids = np.zeros(shape, dtype=like.dtype)
            self.head_ids = np.zeros(shape, dtype=like.dtype)
        if (need <= self.buf_cap).all():
            return
        assert self.head_ids is not None
        cap = np.where(need > self.buf_cap, np.maximum(need, 2 * self.buf_cap), self.buf_cap)
        off = np.concatenate([[0], np.cumsum(cap)[:-1]]).astype(np.int64)
        tok, ids = np.zeros(int(cap.sum()), dtype=np.int64), np.zeros((int(cap.sum()), *like.shape[1:]),
                                                                      dtype=like.dtype)
        head_tok, head_ids = np.zeros_like(tok), np.zeros_like(ids)
        for v in range(cap.size):
            o, new = int(self.buf_off[v]), int(off[v])
            n = min(int(self.cur_ntok[v]), int(self.buf_cap[v]))
            tok[new: new + n], ids[new: new + n] = self.buf_tok[o: o + n], self.buf_ids[o: o + n]
            n = min(int(self.head_ntok[v]), int(self.buf_cap[v]))
            head_tok[new: new + n], head_ids[new: new + n] = self.head_tok[o: o + n], self.head_ids[o: o + n]
        self.buf_cap, self.buf_off = cap.astype(np.int64), off
        self.buf_tok, self.buf_ids, self.head_tok, self.head_ids = tok, ids, head_tok, head_ids

    def feed(self, ids: np.ndarray, steps: np.ndarray, phases: np.ndarray, t0: int, phase_filter: int,
             score_start: int) -> None:
        a = self.arrays
        steps = steps.astype(np.int64, copy=False)
        for lo in range(0, ids.shape[0], PIECE_TOKENS):
            hi = min(lo + PIECE_TOKENS, ids.shape[0])
            grow = self.cur_ntok + (hi - lo)
            self._make_room(np.where(a.tokens_per_step > 0, np.minimum(grow, a.tokens_per_step), grow), ids)
            assert self.buf_ids is not None and self.head_ids is not None
            outputs = self._step_outputs(hi - lo + 1)
            DK.replay_chunk_dispatch(
                self.policy, ids[lo:hi], steps[lo:hi], phases[lo:hi], t0 + lo, phase_filter, score_start,
                a.gpus, a.slots, a.gpn, a.tokens_per_step, a.used, a.phase, a.rep_count, a.rep_slot,
                a.local_slot, a.slot_gpu, self.model, self.cost, a.width, self.sel_count, self.cur_key,
                self.cur_ntok, self.fresh, self.head_key, self.head_ntok, self.buf_off, self.buf_tok,
                self.buf_ids, self.head_tok, self.head_ids, self.tot_gpu, self.tot_int, self.comp, *outputs)
            self._keep_steps(*outputs)

    def _content(self, i: int, head: bool) -> Content:
        n = int(self.head_ntok[i] if head else self.cur_ntok[i])
        ids = self.head_ids if head else self.buf_ids
        if n == 0 or ids is None:
            return _none(), None
        o = int(self.buf_off[i])
        return (self.head_tok if head else self.buf_tok)[o: o + n], ids[o: o + n]

    def _join(self, first: Any, second: Any) -> Content:
        assert first[1] is not None and second[1] is not None
        return np.concatenate([first[0], second[0]]), np.concatenate([first[1], second[1]])

    def _store(self, i: int, head: bool, content: Any) -> None:
        tok, ids = content
        n = tok.size
        if n == 0:
            return
        need = self.buf_cap.copy()
        need[i] = max(need[i], n)
        self._make_room(need, ids)
        o = int(self.buf_off[i])
        (self.head_tok if head else self.buf_tok)[o: o + n] = tok
        target = self.head_ids if head else self.buf_ids
        assert target is not None
        target[o: o + n] = ids

    def _clear_tail(self, i: int) -> None:
        pass  # cur_ntok = 0 empties it

    def _price(self, i: int, content: Any, ntok: int) -> tuple[np.ndarray, ...]:
        tok, ids = content
        a = self.arrays
        t = np.zeros(self.cost.shape[0])
        imb, sglang = DK.route_and_price(
            self.policy, np.ascontiguousarray(tok), np.ascontiguousarray(ids), i, a.gpus, a.slots, a.gpn,
            a.used, a.rep_count, a.rep_slot, a.local_slot, a.slot_gpu, self.model, self.cost, a.width,
            self.tot_int, self.tot_gpu, self.comp, t)
        return step_series(imb, sglang, t, ntok)
