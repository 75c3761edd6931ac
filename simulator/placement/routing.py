"""What traffic-aware policies fit on besides the load: whole steps of routed tokens sampled from the fit
part, and co-selection between consecutive layers counted over all of it.

Shape legend: N sampled tokens, L MoE layers, K top-k, E experts, P sampled steps.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from numba import njit

# Tokens of whole steps kept for the token-level search (memory N x L x K ids; search time grows with N).
SAMPLE_TOKENS = 32768


@dataclass(frozen=True)
class RoutingSample:
    """Whole steps of the fit part, in trace order, and cross-layer co-selection over the whole fit part.

    ids [N, L, K] expert ids (the first is the token's top-1: traces list experts by descending weight);
    token [N] global token index (home GPU = token mod G, the replay's rule); step [N] step ordinal 0..P-1
    within the sample; cross_layer [L - 1, E, E]: tokens whose top-1 expert at layer l is a that choose b at
    layer l + 1.
    """

    ids: np.ndarray
    token: np.ndarray
    step: np.ndarray
    cross_layer: np.ndarray

    @property
    def num_steps(self) -> int:
        return int(self.step.max()) + 1 if self.step.size else 0


@njit(cache=True)
def count_cross_layer(ids: np.ndarray, keep: np.ndarray, out: np.ndarray) -> None:
    """out[l, a, b] += tokens (rows where keep) with top-1 expert a at layer l choosing b at layer l + 1.

    ids [T, L, K]; keep [T] bool; out [L - 1, E, E] int64.
    """
    n_tok, layers, top_k = ids.shape
    for i in range(n_tok):
        if not keep[i]:
            continue
        for layer in range(layers - 1):
            a = ids[i, layer, 0]
            for k in range(top_k):
                out[layer, a, ids[i, layer + 1, k]] += 1


class StepSampler:
    """Keeps every m-th step of a stream of tokens, doubling m whenever the kept tokens pass `budget`, so the
    sample spans the whole fit part in bounded memory (at most 2 x budget tokens are held)."""

    def __init__(self, budget: int = SAMPLE_TOKENS):
        self.budget = budget
        self.stride = 1
        self.step_index = -1  # ordinal of the current step in the stream
        self.last_key: int | None = None
        self.parts: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []  # (ids, token, step ordinal)
        self.kept = 0

    def add(self, ids: np.ndarray, token: np.ndarray, key: np.ndarray) -> None:
        """Feed tokens in order: ids [T, L, K], token [T] global indices, key [T] step keys."""
        if key.size == 0:
            return
        new = np.r_[key[0] != self.last_key if self.last_key is not None else True, key[1:] != key[:-1]]
        ordinal = self.step_index + np.cumsum(new)
        self.step_index = int(ordinal[-1])
        self.last_key = int(key[-1])
        take = ordinal % self.stride == 0
        if take.any():
            self.parts.append((ids[take].astype(np.int32), token[take].astype(np.int64), ordinal[take]))
            self.kept += int(take.sum())
        while self.kept > self.budget and self.step_index > 0:
            self.stride *= 2
            self.parts = [(i[o % self.stride == 0], t[o % self.stride == 0], o[o % self.stride == 0])
                          for i, t, o in self.parts]
            self.kept = sum(t.size for _, t, _ in self.parts)
            if self.stride > self.step_index:  # one step is over the budget: keep it anyway
                break

    def sample(self, cross_layer: np.ndarray, layers: int, top_k: int) -> RoutingSample:
        if not self.parts:
            empty = np.zeros(0, dtype=np.int64)
            return RoutingSample(np.zeros((0, layers, top_k), dtype=np.int32), empty, empty, cross_layer)
        ids = np.concatenate([i for i, _, _ in self.parts])
        token = np.concatenate([t for _, t, _ in self.parts])
        ordinal = np.concatenate([o for _, _, o in self.parts])
        step = np.unique(ordinal, return_inverse=True)[1].astype(np.int64)
        return RoutingSample(ids, token, step, cross_layer)
