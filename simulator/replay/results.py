"""Replay results: per-variant summaries of a finished Segment, and the ReplayResult a replay returns.

Imbalance figures are simulator.metrics'. Shape legend: L MoE layers, G GPUs, H hardware specs.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from simulator import kernels as K
from simulator import metrics
from simulator.cost_model import BF16_BYTES, DEFAULT_HBM_RESERVE, expert_weight_bytes, pricing_for
from simulator.hardware import GpuSpec
from simulator.placement import Placement
from simulator.replay.config import Variant
from simulator.replay.segment import Segment
from traces.schema import TraceMetadata


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
    # the headline (simulator.metrics): per-step busiest over mean GPU load, token-weighted
    step_imbalance: float
    aggregate_imbalance: float  # the same with the whole scored part as one step (simulator.metrics)
    step_imbalance_percentiles: dict[str, float]  # of each step's own ratio: p50 / p95 / p99 / mean
    sglang_balancedness: float  # the engines' own figures, over the same steps (simulator.metrics)
    vllm_balancedness: float
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
        sglang = metrics.sglang_step_balancedness(seg.sglang_layer_sums(i), p.num_layers,
                                                  meta.num_hidden_layers - meta.num_moe_layers)
        steps = int(imb.size)
        tokens = int(ntok.sum())
        assignments = int(tot_gpu.sum())
        mem = float(sum(int((p.slots[layer] >= 0).sum(axis=1).max()) for layer in range(p.num_layers))
                    * ebytes)
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
            slots_per_gpu=p.slots_per_gpu, redundant_experts=v.redundant_experts,
            tokens_per_step=v.tokens_per_step, tokens=tokens, steps=steps, step_tokens=_step_tokens(ntok),
            assignments=assignments,
            step_imbalance=metrics.ratio(float(ti[:, K.I_PEAK].sum()), float(tot_gpu.mean(axis=1).sum())),
            aggregate_imbalance=metrics.aggregate_imbalance(tot_gpu), step_imbalance_percentiles=_pcts(imb),
            sglang_balancedness=metrics.mean_over_steps(sglang),
            vllm_balancedness=metrics.mean_over_steps(metrics.vllm_step_balancedness(imb)),
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
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (policy, reason) of placements left out

    def to_dict(self) -> dict[str, Any]:
        return {
            "trace": self.trace,
            "metadata": self.metadata,
            "config": self.config,
            "fit_tokens": self.fit_tokens,
            "score_start": self.score_start,
            "total_tokens": self.total_tokens,
            "skipped": [{"placement": p, "reason": r} for p, r in self.skipped],
            "placements": [dataclasses.asdict(s) | {"all_to_all_bytes_per_step": s.all_to_all_bytes_per_step}
                           for s in self.placements],
        }


