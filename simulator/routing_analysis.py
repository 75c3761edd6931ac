"""Routing analysis in the style of the OLMoE paper, computed by streaming a trace's chunks.

What it measures, per MoE layer: how skewed the expert load is (entropy, Gini), which experts are hottest,
which experts are chosen together by the same token (co-selection), how prefill and decode tokens differ, and
how stable routing is across the trace (load correlation between consecutive trace segments, and how many
experts a token shares with the previous token of its own sequence).

Counting runs in two Numba kernels (routing_kernels.py) over each chunk, checked against the plain NumPy
functions below; memory depends on L, E and the number of sequences, never on the number of tokens. Shape
legend: T tokens in a chunk, L MoE layers, E experts per layer, K top-k, S trace segments, P consecutive-token
pairs.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from simulator.routing_kernels import count_chunk, shared_sum
from traces.chunk import TraceChunk
from traces.errors import InputError
from traces.reader import DEFAULT_CHUNK_TOKENS, Trace
from traces.schema import PHASE_DECODE, PHASE_PREFILL, TraceMetadata

DEFAULT_SEGMENTS = 8
_OVERLAP_BLOCK = 8192  # pairs compared at once: bounds the [P, L, K, K] comparison to a few MB


# ------------------------------------------------------------------------------------------------------------
# Metrics on load vectors (pure functions, last axis = experts)
# ------------------------------------------------------------------------------------------------------------


def load_entropy(load: np.ndarray) -> np.ndarray:
    """Shannon entropy in bits of the load distribution over the last axis; 0 for an all-zero row.

    load: [..., E] counts. Returns [...]. A perfectly uniform load over E experts gives log2(E).
    """
    load = np.asarray(load, dtype=np.float64)
    total = load.sum(axis=-1, keepdims=True)
    p = np.divide(load, total, out=np.zeros_like(load), where=total > 0)
    with np.errstate(divide="ignore", invalid="ignore"):
        terms = np.where(p > 0, -p * np.log2(p), 0.0)
    return terms.sum(axis=-1)


def gini(load: np.ndarray) -> np.ndarray:
    """Gini coefficient of the load over the last axis: 0 when every expert gets the same load, (E-1)/E when
    one expert gets everything. load: [..., E]. Returns [...] (0 for an all-zero row)."""
    x = np.sort(np.asarray(load, dtype=np.float64), axis=-1)
    n = x.shape[-1]
    rank = np.arange(1, n + 1, dtype=np.float64)
    total = x.sum(axis=-1)
    weighted = ((2 * rank - n - 1) * x).sum(axis=-1)
    return np.divide(weighted, n * total, out=np.zeros_like(total), where=total > 0)


def pearson_rows(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Pearson correlation between matching rows of a and b ([..., E] each); nan where a row is constant."""
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    da = a - a.mean(axis=-1, keepdims=True)
    db = b - b.mean(axis=-1, keepdims=True)
    denom = np.sqrt((da * da).sum(axis=-1) * (db * db).sum(axis=-1))
    num = (da * db).sum(axis=-1)
    return np.divide(num, denom, out=np.full_like(num, np.nan), where=denom > 0)


def total_variation(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Total variation distance between the distributions a and b over the last axis (0 same, 1 disjoint)."""
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    sa = a.sum(axis=-1, keepdims=True)
    sb = b.sum(axis=-1, keepdims=True)
    pa = np.divide(a, sa, out=np.zeros_like(a), where=sa > 0)
    pb = np.divide(b, sb, out=np.zeros_like(b), where=sb > 0)
    return 0.5 * np.abs(pa - pb).sum(axis=-1)


# ------------------------------------------------------------------------------------------------------------
# Per-chunk counting kernels (pure NumPy)
# ------------------------------------------------------------------------------------------------------------


def layer_expert_counts(expert_ids: np.ndarray, num_experts: int) -> np.ndarray:
    """Assignments per (layer, expert). expert_ids: [T, L, K] -> [L, E] int64."""
    _, num_layers, _ = expert_ids.shape
    offset = (np.arange(num_layers, dtype=np.int64) * num_experts)[None, :, None]  # [1, L, 1]
    flat = (expert_ids.astype(np.int64) + offset).ravel()
    return np.bincount(flat, minlength=num_layers * num_experts).reshape(num_layers, num_experts)


def coselection_counts(expert_ids: np.ndarray, num_experts: int) -> np.ndarray:
    """Tokens that chose both experts i and j in a layer (i != j), symmetric; the diagonal holds each expert's
    load.

    expert_ids: [T, L, K] (no repeated expert within a row) -> [L, E, E] int64.
    """
    _, num_layers, k = expert_ids.shape
    ii, jj = np.triu_indices(k, 1)  # the K(K-1)/2 unordered pairs of top-k columns
    out = np.zeros((num_layers, num_experts, num_experts), dtype=np.int64)
    for layer in range(num_layers):
        ids = expert_ids[:, layer, :].astype(np.int64)  # [T, K]
        pair = (ids[:, ii] * num_experts + ids[:, jj]).ravel()
        upper = np.bincount(pair, minlength=num_experts * num_experts).reshape(num_experts, num_experts)
        out[layer] = upper + upper.T
        out[layer][np.diag_indices(num_experts)] = np.bincount(ids.ravel(), minlength=num_experts)
    return out


def with_diagonal(coselection: np.ndarray, load: np.ndarray) -> np.ndarray:
    """A copy of co-selection counts [L, E, E] with each expert's load [L, E] on the diagonal."""
    out = coselection.copy()
    idx = np.arange(out.shape[1])
    out[:, idx, idx] = load
    return out


def shared_experts(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Experts two tokens have in common, per layer. a, b: [P, L, K] -> [P, L] int64."""
    out = np.empty(a.shape[:2], dtype=np.int64)
    for start in range(0, a.shape[0], _OVERLAP_BLOCK):
        sa = a[start:start + _OVERLAP_BLOCK]
        sb = b[start:start + _OVERLAP_BLOCK]
        out[start:start + _OVERLAP_BLOCK] = (sa[:, :, :, None] == sb[:, :, None, :]).sum(axis=(2, 3))
    return out


# ------------------------------------------------------------------------------------------------------------
# Streaming accumulator
# ------------------------------------------------------------------------------------------------------------


@dataclass
class _LastTokens:
    """The latest token seen of each sequence, so consecutive tokens pair up across chunk boundaries. [M] /
    [M, L, K]"""

    seq_id: np.ndarray
    position: np.ndarray
    expert_ids: np.ndarray


class RoutingAccumulator:
    """Feed chunks (with expert_ids, phase, seq_id, position) in trace order; `result()` gives a
    RoutingAnalysis.

    num_tokens: the trace's length, used to cut it into `segments` equal token ranges for the stability
    metrics.
    """

    FIELDS = ("expert_ids", "phase", "seq_id", "position")

    def __init__(self, metadata: TraceMetadata, num_tokens: int, segments: int = DEFAULT_SEGMENTS):
        if segments < 1:
            raise InputError(f"--segments must be at least 1, not {segments}")
        self.metadata = metadata
        L, E = metadata.num_moe_layers, metadata.num_experts
        self.num_tokens = num_tokens
        self.segments = max(1, min(segments, num_tokens)) if num_tokens else 1
        self.seen = 0
        self.phase_tokens = np.zeros(2, dtype=np.int64)
        self.phase_load = np.zeros((2, L, E), dtype=np.int64)  # [phase, L, E]
        self.segment_load = np.zeros((self.segments, L, E), dtype=np.int64)  # [S, L, E]
        # off-diagonal pairs; result() adds the diagonal
        self.coselection = np.zeros((L, E, E), dtype=np.int64)
        # experts shared with the previous token, summed over pairs
        self.overlap_sum = np.zeros(L, dtype=np.int64)
        self.overlap_pairs = 0
        K = metadata.top_k
        self._last = _LastTokens(np.zeros(0, np.int64), np.zeros(0, np.int64),
                                 np.zeros((0, L, K), metadata.id_dtype))

    def add(self, chunk: TraceChunk) -> None:
        ids, phase = chunk.expert_ids, chunk.phase
        if ids is None or phase is None:
            raise ValueError("routing analysis needs the expert_ids and phase columns")
        T = ids.shape[0]
        if T == 0:
            return
        # the kernels index arrays by these values without bounds checks: refuse a corrupt chunk first
        if int(ids.max()) >= self.metadata.num_experts or int(phase.max()) > PHASE_DECODE:
            raise InputError(f"trace tokens {self.seen}..{self.seen + T}: expert id or phase out of range "
                             "(run `moe-sim validate`)")
        # Segment s holds global tokens [s*N/S, (s+1)*N/S).
        index = np.arange(self.seen, self.seen + T, dtype=np.int64)
        seg = np.minimum(index * self.segments // max(self.num_tokens, 1), self.segments - 1)
        count_chunk(ids, phase, seg, self.phase_load, self.segment_load, self.coselection)
        self.phase_tokens += np.bincount(phase, minlength=2)[:2]
        if chunk.seq_id is not None and chunk.position is not None:
            self._add_consecutive(chunk.seq_id, chunk.position, ids)
        self.seen += T

    def _add_consecutive(self, seq_id: np.ndarray, position: np.ndarray, ids: np.ndarray) -> None:
        """Pair each token with the token at position - 1 of its sequence (from this chunk or an earlier
        one)."""
        last = self._last
        all_seq = np.concatenate([last.seq_id, seq_id.astype(np.int64)])
        all_pos = np.concatenate([last.position, position.astype(np.int64)])
        all_ids = np.concatenate([last.expert_ids.astype(ids.dtype), ids])  # [M + T, L, K]
        order = np.lexsort((all_pos, all_seq))
        s, p = all_seq[order], all_pos[order]
        adjacent = (s[1:] == s[:-1]) & (p[1:] == p[:-1] + 1)
        prev, cur = order[:-1][adjacent], order[1:][adjacent]
        if prev.size:
            shared_sum(all_ids, all_ids, prev, cur, self.metadata.num_experts, self.overlap_sum)
            self.overlap_pairs += int(prev.size)
        is_last = np.ones(s.size, dtype=bool)
        is_last[:-1] = s[1:] != s[:-1]
        keep = order[is_last]
        self._last = _LastTokens(all_seq[keep], all_pos[keep], all_ids[keep])

    def result(self) -> RoutingAnalysis:
        return RoutingAnalysis(
            num_tokens=int(self.seen),
            top_k=self.metadata.top_k,
            layer_names=[str(i) for i in self.metadata.moe_layers],
            phase_tokens=self.phase_tokens.copy(),
            phase_load=self.phase_load.copy(),
            segment_load=self.segment_load.copy(),
            coselection=with_diagonal(self.coselection, self.phase_load.sum(axis=0)),
            overlap_sum=self.overlap_sum.copy(),
            overlap_pairs=self.overlap_pairs,
        )


def analyze_routing(
    trace: Trace,
    *,
    segments: int = DEFAULT_SEGMENTS,
    chunk_tokens: int = DEFAULT_CHUNK_TOKENS,
    progress: Callable[[int], None] | None = None,
) -> RoutingAnalysis:
    """Stream the trace once and return its routing analysis. progress(n) is called with each chunk's token
    count."""
    if trace.num_tokens == 0:
        raise InputError(f"{trace.paths[0]}: the trace has no tokens to analyse")
    acc = RoutingAccumulator(trace.metadata, trace.num_tokens, segments)
    for chunk in trace.iter_chunks(RoutingAccumulator.FIELDS, chunk_tokens=chunk_tokens):
        acc.add(chunk)
        if progress is not None:
            progress(chunk.num_tokens)
    return acc.result()


# ------------------------------------------------------------------------------------------------------------
# Result with derived metrics
# ------------------------------------------------------------------------------------------------------------


@dataclass
class RoutingAnalysis:
    """Raw counts from one pass over a trace, and the metrics derived from them.

    phase_load: [2, L, E] assignments per phase (index PHASE_PREFILL / PHASE_DECODE)
    segment_load: [S, L, E] assignments per equal token range of the trace, in order
    coselection: [L, E, E] tokens choosing both i and j (diagonal: tokens choosing i)
    overlap_sum: [L] experts shared with the previous token of the same sequence, summed over overlap_pairs
    pairs
    """

    num_tokens: int
    top_k: int
    layer_names: list[str]
    phase_tokens: np.ndarray
    phase_load: np.ndarray
    segment_load: np.ndarray
    coselection: np.ndarray
    overlap_sum: np.ndarray
    overlap_pairs: int

    @property
    def load(self) -> np.ndarray:
        """[L, E] assignments per expert over the whole trace."""
        return self.phase_load.sum(axis=0)

    @property
    def num_layers(self) -> int:
        return int(self.phase_load.shape[1])

    @property
    def num_experts(self) -> int:
        return int(self.phase_load.shape[2])

    def entropy(self) -> np.ndarray:
        """[L] load entropy in bits."""
        return load_entropy(self.load)

    def normalized_entropy(self) -> np.ndarray:
        """[L] entropy / log2(E): 1 for perfectly even load."""
        return (self.entropy() / np.log2(self.num_experts) if self.num_experts > 1
                else np.ones(self.num_layers))

    def gini(self) -> np.ndarray:
        """[L] Gini coefficient of the expert load."""
        return gini(self.load)

    def max_over_mean(self) -> np.ndarray:
        """[L] hottest expert's load over the mean expert load."""
        load = self.load.astype(np.float64)
        mean = load.mean(axis=1)
        return np.divide(load.max(axis=1), mean, out=np.zeros_like(mean), where=mean > 0)

    def top_experts(self, n: int = 5) -> list[list[tuple[int, float]]]:
        """Per layer, the n most-chosen experts as (expert id, share of the layer's assignments), hottest
        first."""
        load = self.load
        out = []
        for row in load:
            total = row.sum()
            order = np.argsort(-row, kind="stable")[:n]
            out.append([(int(e), float(row[e] / total) if total else 0.0) for e in order])
        return out

    def coselection_conditional(self, layer: int) -> np.ndarray:
        """[E, E] P(token also chose j | it chose i) in one layer; rows of unused experts are 0; diagonal set
        to 0."""
        co = self.coselection[layer].astype(np.float64)
        chosen = np.diag(co).copy()
        out = np.divide(co, chosen[:, None], out=np.zeros_like(co), where=chosen[:, None] > 0)
        np.fill_diagonal(out, 0.0)
        return out

    def coselection_lift(self, layer: int) -> np.ndarray:
        """[E, E] how much more often i and j are chosen together than if tokens chose them independently:
        N(i,j) * T / (N(i) * N(j)). 1 means independent; diagonal set to 0."""
        co = self.coselection[layer].astype(np.float64)
        n = np.diag(co).copy()
        denom = np.outer(n, n)
        out = np.divide(co * self.num_tokens, denom, out=np.zeros_like(co), where=denom > 0)
        np.fill_diagonal(out, 0.0)
        return out

    def top_pairs(self, layer: int, n: int = 5, by: str = "count",
                  min_share: float = 0.0) -> list[tuple[int, int, int, float]]:
        """The n expert pairs of a layer chosen together most often (by="count") or most above chance
        (by="lift"), among pairs chosen together by at least min_share of the tokens: (i, j, tokens, lift), i
        < j."""
        co = self.coselection[layer]
        lift = self.coselection_lift(layer)
        iu, ju = np.triu_indices(self.num_experts, 1)
        counts = co[iu, ju]
        key = counts.astype(np.float64) if by == "count" else lift[iu, ju]
        eligible = (counts > 0) & (counts >= min_share * self.num_tokens)
        order = [o for o in np.argsort(-key, kind="stable") if eligible[o]][:n]
        return [(int(iu[o]), int(ju[o]), int(counts[o]), float(lift[iu[o], ju[o]])) for o in order]

    def phase_comparison(self) -> dict[str, Any]:
        """Prefill against decode per layer: entropy of each, total variation distance and load
        correlation."""
        prefill, decode = self.phase_load[PHASE_PREFILL], self.phase_load[PHASE_DECODE]
        both = bool(self.phase_tokens[PHASE_PREFILL] and self.phase_tokens[PHASE_DECODE])
        nan = np.full(self.num_layers, np.nan)
        return {
            "prefill_tokens": int(self.phase_tokens[PHASE_PREFILL]),
            "decode_tokens": int(self.phase_tokens[PHASE_DECODE]),
            "prefill_entropy": load_entropy(prefill),
            "decode_entropy": load_entropy(decode),
            "total_variation": total_variation(prefill, decode) if both else nan,
            "correlation": pearson_rows(prefill, decode) if both else nan,
        }

    def stability(self) -> dict[str, Any]:
        """How stable routing is across the trace.

        segment_correlation: [S-1, L] load correlation of each segment with the one before;
        whole_correlation: [S, L] each segment's load against the whole trace's;
        top_retained: [L] share of the first segment's top-K experts still top-K in the last segment;
        consecutive_overlap: [L] mean experts a token shares with the previous token of its sequence, over K;
        independent_overlap: [L] the same expected if tokens chose independently with the trace's per-expert
        rates.
        """
        seg = self.segment_load
        k = self.top_k
        retained = np.array([
            len(set(np.argsort(-seg[0, layer], kind="stable")[:k])
                & set(np.argsort(-seg[-1, layer], kind="stable")[:k])) / k
            for layer in range(self.num_layers)
        ])
        rate = self.load.astype(np.float64) / max(self.num_tokens, 1)  # [L, E] P(token chose e)
        pairs = self.overlap_pairs
        return {
            "segments": int(seg.shape[0]),
            "segment_correlation": pearson_rows(seg[1:], seg[:-1]) if seg.shape[0] > 1
            else np.zeros((0, self.num_layers)),
            "whole_correlation": pearson_rows(seg, np.broadcast_to(self.load, seg.shape)),
            "top_retained": retained,
            "consecutive_pairs": pairs,
            "consecutive_overlap": self.overlap_sum / (pairs * k) if pairs
            else np.full(self.num_layers, np.nan), "independent_overlap": (rate * rate).sum(axis=1) / k,
        }

    def summary(self) -> dict[str, Any]:
        """Every metric as plain lists and numbers (JSON-ready)."""
        def plain(value: Any) -> Any:
            if isinstance(value, np.ndarray):
                return [plain(v) for v in value.tolist()] if value.ndim else plain(value.item())
            if isinstance(value, float) and not np.isfinite(value):
                return None
            if isinstance(value, dict):
                return {k: plain(v) for k, v in value.items()}
            if isinstance(value, list | tuple):
                return [plain(v) for v in value]
            return value

        return plain({
            "num_tokens": self.num_tokens,
            "layers": self.layer_names,
            "num_experts": self.num_experts,
            "top_k": self.top_k,
            "entropy_bits": self.entropy(),
            "normalized_entropy": self.normalized_entropy(),
            "gini": self.gini(),
            "max_over_mean": self.max_over_mean(),
            "top_experts": self.top_experts(),
            "phases": self.phase_comparison(),
            "stability": self.stability(),
        })
