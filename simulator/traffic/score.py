"""Score fitted placements' all-to-all bytes and step imbalance over a trace's scored part, under the home or
the stay dispatch model (kernels.py), in one pass; bytes priced as the cost model prices a token copy.

Shape legend: V placements, L MoE layers, G GPUs.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import numpy as np

from simulator import kernels as K
from simulator import metrics
from simulator.cost_model import model_vector
from simulator.options import PHASES
from simulator.placement import Placement
from simulator.replay.config import Variant
from simulator.replay.segment import VariantArrays
from simulator.traffic import kernels as TK
from traces.errors import InputError
from traces.reader import DEFAULT_CHUNK_TOKENS, Trace


@dataclass(frozen=True)
class TrafficScore:
    """One placement under one dispatch model, over the scored tokens."""

    label: str
    dispatch_model: str  # "home" or "stay"
    tokens: int
    steps: int
    step_imbalance: float  # simulator.metrics' step imbalance
    dispatch_bytes_per_token: float  # summed over layers: scale-up + scale-out
    combine_bytes_per_token: float
    scale_out_bytes_per_token: float  # the part of both that crosses nodes

    @property
    def all_to_all_bytes_per_token(self) -> float:
        return self.dispatch_bytes_per_token + self.combine_bytes_per_token

    def to_dict(self) -> dict[str, object]:
        return {"label": self.label, "dispatch_model": self.dispatch_model, "tokens": self.tokens,
                "steps": self.steps, "step_imbalance": self.step_imbalance,
                "all_to_all_bytes_per_token": self.all_to_all_bytes_per_token,
                "dispatch_bytes_per_token": self.dispatch_bytes_per_token,
                "combine_bytes_per_token": self.combine_bytes_per_token,
                "scale_out_bytes_per_token": self.scale_out_bytes_per_token}


@dataclass
class TrafficTotals:
    """What traffic_chunk fills: pairs [V, L, 4] (kernels.P_*), summed step peaks and means, steps, tokens."""

    pairs: np.ndarray
    peak_sum: np.ndarray
    mean_sum: np.ndarray
    steps: np.ndarray
    tokens: np.ndarray


# (t0, ids [T, L, K], steps [T], phases [T]) in trace order
Chunks = Iterable[tuple[int, np.ndarray, np.ndarray, np.ndarray]]


def score_arrays(ids_chunks: Chunks, placements: list[Placement],
                 num_experts: int, *, stay: bool, phase_filter: int = -1, score_start: int = 0,
                 tokens_per_step: int = 0) -> TrafficTotals:
    """Run the kernel over chunks (t0, ids [T, L, K], steps [T], phases [T]) in trace order for placements."""
    arrays = VariantArrays.build([Variant(p.policy, p, tokens_per_step, 0) for p in placements], num_experts)
    v = len(placements)
    layers = placements[0].num_layers
    states = 2 if tokens_per_step > 0 else 1
    sel_count = np.zeros(2, dtype=np.int64)
    cur_key = np.full((v, states), np.iinfo(np.int64).min, dtype=np.int64)
    open_ntok = np.zeros((v, states), dtype=np.int64)
    open_load = np.zeros((v, states, layers, arrays.g_max), dtype=np.int64)
    totals = TrafficTotals(np.zeros((v, layers, 4), dtype=np.int64), np.zeros(v), np.zeros(v),
                           np.zeros(v, dtype=np.int64), np.zeros(v, dtype=np.int64))
    for t0, ids, steps, phases in ids_chunks:
        TK.traffic_chunk(ids, steps.astype(np.int64, copy=False), phases, t0, phase_filter, score_start,
                         tokens_per_step, stay, arrays.gpus, arrays.gpn, arrays.rep_count, arrays.rep_slot,
                         arrays.local_slot, arrays.slot_gpu, sel_count, cur_key, open_ntok, open_load,
                         totals.pairs, totals.peak_sum, totals.mean_sum, totals.steps, totals.tokens)
    for i in range(v):
        for q in range(states):
            TK.close_steps(open_load, open_ntok, arrays.gpus, totals.peak_sum, totals.mean_sum, totals.steps,
                           i, q)
    return totals


def summarize(totals: TrafficTotals, labels: list[str], model: np.ndarray, dispatch_model: str
              ) -> list[TrafficScore]:
    """Bytes per token from pair counts: a dispatch pair carries one hidden state, a combine pair one partial
    output (cost_model.model_vector)."""
    out = []
    for i, label in enumerate(labels):
        n = max(int(totals.tokens[i]), 1)
        p = totals.pairs[i].sum(axis=0)  # [4]
        dispatch = (p[TK.P_SU_DISPATCH] + p[TK.P_SO_DISPATCH]) * model[K.M_DISPATCH_BYTES] / n
        combine = (p[TK.P_SU_COMBINE] + p[TK.P_SO_COMBINE]) * model[K.M_COMBINE_BYTES] / n
        scale_out = (p[TK.P_SO_DISPATCH] * model[K.M_DISPATCH_BYTES]
                     + p[TK.P_SO_COMBINE] * model[K.M_COMBINE_BYTES]) / n
        out.append(TrafficScore(label, dispatch_model, int(totals.tokens[i]), int(totals.steps[i]),
                                metrics.ratio(float(totals.peak_sum[i]), float(totals.mean_sum[i])),
                                float(dispatch), float(combine), float(scale_out)))
    return out


def score_traffic(trace: Trace, placements: list[Placement], labels: list[str], *, dispatch_model: str,
                  phase: str = "all", score_start: int = 0, tokens_per_step: int = 0,
                  chunk_tokens: int = DEFAULT_CHUNK_TOKENS) -> list[TrafficScore]:
    """Every placement scored over the trace's tokens from score_start on, in one pass."""
    if dispatch_model not in TK.DISPATCH_MODELS:
        raise InputError(f"--dispatch-model must be one of {', '.join(TK.DISPATCH_MODELS)}, not "
                         f"{dispatch_model!r}")
    meta = trace.metadata

    def chunks() -> Iterator[tuple[int, np.ndarray, np.ndarray, np.ndarray]]:
        t0 = 0
        for chunk in trace.iter_chunks(("expert_ids", "step", "phase"), chunk_tokens):
            assert chunk.expert_ids is not None and chunk.step is not None and chunk.phase is not None
            if t0 + chunk.num_tokens > score_start:
                yield t0, chunk.expert_ids, chunk.step, chunk.phase
            t0 += chunk.num_tokens

    totals = score_arrays(chunks(), placements, meta.num_experts,
                          stay=dispatch_model == "stay", phase_filter=PHASES[phase], score_start=score_start,
                          tokens_per_step=tokens_per_step)
    return summarize(totals, labels, model_vector(meta, None), dispatch_model)
