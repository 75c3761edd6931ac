"""The cost model's constants and small formulas (docs/cost-model.md explains each, with sources).

Peak hardware figures live in hardware.py; this module turns them into the effective rates the kernels use,
and estimates the model's non-expert work and memory from the trace metadata. No I/O.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from functools import lru_cache

import numpy as np

from simulator import expert_time as X
from simulator import kernels as K
from simulator.hardware import PRESETS, GpuSpec
from simulator.profiles import CostProfile, ExpertWork, ShapeProfile, load_profile
from simulator.profiles import NonExpertWork as MeasuredNonExpert
from traces.schema import TraceMetadata

# Measured by this project through PyTorch: bf16 8192^3 matmul 780-798 TFLOP/s on H100 SXM (peak 989).
MATMUL_EFFICIENCY = 790 / 989
# Also measured here: device-to-device copy about 3.0 TB/s on H100 (peak 3.35 TB/s).
HBM_EFFICIENCY = 3.0 / 3.35
# DeepEP normal kernels (deepseek-ai/DeepEP README), intranode EP8 on H800: dispatch 153 GB/s, combine 158
# GB/s, against H800 NVLink's 200 GB/s per direction (400 GB/s bidirectional). The H100 NCCL all-reduce bus
# bandwidth measured here, 355 of 450 GB/s (0.79), agrees.
H800_NVLINK_PER_DIRECTION = 200e9
SCALE_UP_DISPATCH_EFFICIENCY = 153e9 / H800_NVLINK_PER_DIRECTION
SCALE_UP_COMBINE_EFFICIENCY = 158e9 / H800_NVLINK_PER_DIRECTION
# DeepEP internode EP16 over CX7 400 Gb/s (50 GB/s): 43 GB/s dispatch and combine, the lowest of EP16/32/64
# (43/58/51), so the model does not promise more than DeepEP reaches at every size.
CX7_PER_DIRECTION = 50e9
SCALE_OUT_DISPATCH_EFFICIENCY = 43e9 / CX7_PER_DIRECTION
SCALE_OUT_COMBINE_EFFICIENCY = 43e9 / CX7_PER_DIRECTION

BF16_BYTES = 2  # serving precision of weights and of dispatched / combined activations
DEFAULT_HBM_RESERVE = 0.30  # share of HBM kept for KV cache, activations and the runtime (stated assumption)
DEFAULT_CONTEXT_TOKENS = 2048  # attention context assumed for the non-expert estimate (stated assumption)
# Default per-GPU batches swept by `plan` (tokens per GPU per step; docs/cost-model.md "Batch per GPU" says
# why): decode-sized around DeepEP's low-latency setting of 128 tokens per GPU, prefill-sized around its
# normal-kernel setting of 4096, and for mixed traffic a decode-sized, a middle and a chunked-prefill-sized
# batch.
DEFAULT_TOKENS_PER_GPU = {"decode": (32, 128, 512), "prefill": (1024, 4096, 16384), "all": (128, 1024, 4096)}


ROOFLINE = "roofline (uncalibrated)"


@dataclass(frozen=True)
class Pricing:
    """What prices one GPU type's replay for one trace's shapes, and how to say so."""

    source: str  # "measured profile h200-torch-grouped-mm", "extrapolated from h200 ...", or ROOFLINE
    expert: ExpertWork | None  # None: roofline
    non_expert: MeasuredNonExpert | None  # None: roofline (no measurement for these shapes)
    profile: CostProfile | None
    communication: str  # where the all-to-all figures come from
    measured_on: GpuSpec | None = None  # the preset the profile was measured on (None: roofline)
    on_measured_gpu: bool = False  # priced on that GPU's own figures (else moved there by datasheet ratios)

    def to_dict(self) -> dict[str, str]:
        return {"expert_time": self.source, "non_expert_time": self.non_expert_source,
                "all_to_all": self.communication}

    @property
    def non_expert_source(self) -> str:
        if self.non_expert is None:
            return ROOFLINE
        return self.source.replace("profile", "profile (non-expert part)", 1)


DEEPEP_COMMUNICATION = "DeepEP intranode and internode figures (not measured here)"


def _same_gpu(a: GpuSpec, b: GpuSpec) -> bool:
    return (a.bf16_flops, a.hbm_bandwidth) == (b.bf16_flops, b.hbm_bandwidth)


def _source(prof: CostProfile, same_gpu: bool, shape_note: str | None) -> str:
    """The one wording of what priced expert time, for tables, JSON, reports and `moe-sim hardware`."""
    if same_gpu and shape_note is None:
        return f"measured profile {prof.label}"
    parts = ([] if same_gpu
             else [f"from {prof.hardware} by datasheet ratios"]) + ([shape_note] if shape_note else [])
    return f"extrapolated ({'; '.join(parts)}) of profile {prof.label}"


def gpu_pricing_source(gpu: GpuSpec) -> str:
    """What prices this GPU's expert time for a shape its profile measured (listings that know no trace)."""
    if gpu.profile is None:
        return ROOFLINE
    prof = load_profile(gpu.profile)
    return _source(prof, _same_gpu(gpu, PRESETS.get(prof.hardware, gpu)), None)


def pricing_for(gpu: GpuSpec, meta: TraceMetadata) -> Pricing:
    """The expert and non-expert models for this GPU and these shapes: measured, derived, or the roofline."""
    if gpu.profile is None:
        return Pricing(ROOFLINE, None, None, None, DEEPEP_COMMUNICATION)
    try:
        stamp = os.stat(gpu.profile).st_mtime_ns  # a rewritten profile is priced again
    except OSError:
        stamp = 0  # load_profile names the missing file
    return _pricing(gpu, meta.hidden_size, meta.expert_intermediate_size, meta.expert_activation,
                    meta.flops_per_assignment, expert_weight_bytes(meta), non_expert_key(meta), stamp)


def non_expert_key(meta: TraceMetadata) -> tuple[tuple[str, int], ...]:
    return tuple(sorted({"hidden_size": meta.hidden_size,
                         "num_attention_heads": meta.num_attention_heads or 0,
                         "num_key_value_heads": meta.num_key_value_heads or 0, "head_dim": meta.head_dim or 0,
                         "vocab_size": meta.vocab_size or 0, "num_experts": meta.num_experts,
                         "num_shared_experts": meta.num_shared_experts,
                         "shared_expert_intermediate_size": meta.shared_expert_intermediate_size,
                         "dense_intermediate_size": meta.dense_intermediate_size}.items()))


@lru_cache(maxsize=64)
def _pricing(gpu: GpuSpec, hidden: int, ffn: int, activation: str, flops_per_row: float, expert_bytes: float,
             ne_key: tuple[tuple[str, int], ...], stamp: int) -> Pricing:
    assert gpu.profile is not None
    prof = load_profile(gpu.profile)
    shape, exact = prof.shape_for(hidden, ffn, activation)
    measured_on = PRESETS.get(prof.hardware, gpu)
    same = _same_gpu(gpu, measured_on)
    work = shape.expert
    if not exact or not same:
        rf = rt = None
        if not same:
            rf = X.roofline_table(expert_bytes, flops_per_row, measured_on.bf16_flops,
                                  measured_on.hbm_bandwidth)
            rt = X.roofline_table(expert_bytes, flops_per_row, gpu.bf16_flops, gpu.hbm_bandwidth)
        work = X.scale_expert_work(work, shape_ratio=hidden * ffn
                                   / (shape.hidden_size * shape.expert_intermediate_size),
                                   hidden_ratio=hidden / shape.hidden_size, roofline_from=rf, roofline_to=rt,
                                   hbm_ratio=measured_on.hbm_bandwidth / gpu.hbm_bandwidth)
    source = _source(prof, same, None if exact else f"from the measured shape {shape.shape_label}")
    ne = shape.non_expert if exact and shape.non_expert is not None and _key_matches(shape,
                                                                                     dict(ne_key)) else None
    comm = DEEPEP_COMMUNICATION
    if prof.communication.source == "measured":
        comm = f"measured all-to-all of profile {prof.label}" + ("" if same else f" (on {prof.hardware})")
    return Pricing(source, work, ne, prof, comm, measured_on, same)


def _key_matches(shape: ShapeProfile, key: dict[str, int]) -> bool:
    assert shape.non_expert is not None
    return all(key.get(k) == v for k, v in shape.non_expert.key.items())


def cost_row(gpu: GpuSpec, meta: TraceMetadata | None = None) -> np.ndarray:
    """[NUM_COST_COLUMNS] effective rates of one GPU in the kernels' C_* column order, with the measured
    expert model of its profile for the trace's shapes (meta) when it has one."""
    row = np.zeros(K.NUM_COST_COLUMNS)
    row[K.C_FLOPS] = gpu.bf16_flops * MATMUL_EFFICIENCY
    row[K.C_HBM] = gpu.hbm_bandwidth * HBM_EFFICIENCY
    row[K.C_SU_DISPATCH] = gpu.scale_up_bandwidth * SCALE_UP_DISPATCH_EFFICIENCY
    row[K.C_SU_COMBINE] = gpu.scale_up_bandwidth * SCALE_UP_COMBINE_EFFICIENCY
    row[K.C_SO_DISPATCH] = gpu.scale_out_bandwidth * SCALE_OUT_DISPATCH_EFFICIENCY
    row[K.C_SO_COMBINE] = gpu.scale_out_bandwidth * SCALE_OUT_COMBINE_EFFICIENCY
    row[K.C_SU_LAT] = gpu.scale_up_latency
    row[K.C_SO_LAT] = gpu.scale_out_latency
    if gpu.profile is None:
        return row
    if meta is None:
        raise ValueError("a profiled GPU needs the trace metadata to price its expert shapes")
    pricing = pricing_for(gpu, meta)
    assert pricing.profile is not None
    comm = pricing.profile.communication
    if comm.source == "measured" and pricing.on_measured_gpu:
        assert comm.dispatch_bytes_per_s and comm.combine_bytes_per_s and comm.latency_s is not None
        row[K.C_SU_DISPATCH] = comm.dispatch_bytes_per_s
        row[K.C_SU_COMBINE] = comm.combine_bytes_per_s
        row[K.C_SU_LAT] = comm.latency_s
    work = pricing.expert
    assert work is not None
    row[K.C_PROFILED] = 1.0
    row[K.C_TILE] = work.tile_rows
    row[K.C_FIXED] = work.fixed_seconds
    row[K.C_PER_ASSIGN] = work.per_assignment_seconds
    row[K.C_TABLE:K.C_SMALL] = np.log2(work.gemm_seconds).ravel()
    for x in range(1, K.SMALL_MAX + 1):  # the kernel's own interpolation, tabulated for one-tile experts
        row[K.C_SMALL + x] = K.profiled_gemm_seconds(row, x, float(x * work.tile_rows))
    if work.overhead_seconds is not None:
        row[K.C_OVERHEAD] = 1.0
        row[K.C_OVERHEAD + 1: K.C_OVERHEAD_SMALL] = np.log2(work.overhead_seconds)
        for a in range(K.SMALL_MAX + 1):
            row[K.C_OVERHEAD_SMALL + a] = K.profiled_overhead_seconds(row, float(a))
    return row


def cost_matrix(gpus: list[GpuSpec], meta: TraceMetadata | None = None) -> np.ndarray:
    """[H, NUM_COST_COLUMNS] cost rows for the kernels."""
    return np.stack([cost_row(g, meta) for g in gpus])


def expert_matrices(meta: TraceMetadata) -> int:
    return 3 if meta.expert_activation == "swiglu" else 2


def expert_weight_bytes(meta: TraceMetadata, weight_bytes: int = BF16_BYTES) -> float:
    """Bytes of one routed expert: matrices x hidden x expert FFN x bytes per weight."""
    return float(expert_matrices(meta) * meta.hidden_size * meta.expert_intermediate_size * weight_bytes)


def model_vector(meta: TraceMetadata, capacity_factor: float | None, weight_bytes: int = BF16_BYTES,
                 activation_bytes: int = BF16_BYTES) -> np.ndarray:
    """[6] per-model entries in the kernels' M_* order. FLOPs per assignment come from the metadata."""
    out = np.zeros(K.NUM_MODEL_ENTRIES)
    out[K.M_FLOPS] = meta.flops_per_assignment
    out[K.M_EXPERT_BYTES] = expert_weight_bytes(meta, weight_bytes)
    out[K.M_DISPATCH_BYTES] = meta.hidden_size * activation_bytes  # one token's hidden state per copy
    out[K.M_COMBINE_BYTES] = meta.hidden_size * activation_bytes  # one partial expert output per copy
    out[K.M_CAPACITY_FACTOR] = capacity_factor if capacity_factor else 0.0
    out[K.M_TOP_K] = meta.top_k
    return out


@dataclass(frozen=True)
class NonExpertWork:
    """Work outside the routed experts, per token and per GPU (data-parallel attention: each GPU holds a
    copy)."""

    # attention projections and scores, dense FFN layers, shared experts, routers, LM head
    flops_per_token: float
    weight_bytes: float  # all non-expert weights (embeddings included), read once per step by every GPU
    assumptions: tuple[str, ...]
    meta: TraceMetadata | None = None  # for a profile's measured non-expert tables
    context_tokens: int = DEFAULT_CONTEXT_TOKENS

    def step_seconds(self, gpu: GpuSpec, tokens_per_gpu: float) -> float:
        """One step's non-expert time on one GPU."""
        return float(self.step_seconds_array(gpu, np.asarray([tokens_per_gpu], dtype=np.float64))[0])

    def roofline_seconds(self, gpu: GpuSpec, tokens_per_gpu: np.ndarray) -> np.ndarray:
        compute = self.flops_per_token * tokens_per_gpu / (gpu.bf16_flops * MATMUL_EFFICIENCY)
        reads = self.weight_bytes / (gpu.hbm_bandwidth * HBM_EFFICIENCY)
        return np.maximum(compute, reads)

    def step_seconds_array(self, gpu: GpuSpec, tokens_per_gpu: np.ndarray,
                           prefill: np.ndarray | bool = False) -> np.ndarray:
        """Per step [n] (tokens per GPU of each step; prefill [n] marks prefill steps): the profile's measured
        non-expert tables where it has them for these shapes (moved to another GPU by the ratio of the two
        rooflines), else the roofline."""
        tokens_per_gpu = np.asarray(tokens_per_gpu, dtype=np.float64)
        pricing = pricing_for(gpu, self.meta) if self.meta is not None else None
        if pricing is None or pricing.non_expert is None or pricing.measured_on is None:
            return self.roofline_seconds(gpu, tokens_per_gpu)
        meta = self.meta
        assert meta is not None
        t = X.non_expert_seconds(pricing.non_expert, tokens_per_gpu, self.context_tokens,
                                 meta.num_hidden_layers, meta.num_hidden_layers - meta.num_moe_layers,
                                 prefill)
        if not pricing.on_measured_gpu:
            t = t * self.roofline_seconds(gpu, tokens_per_gpu) / self.roofline_seconds(pricing.measured_on,
                                                                                       tokens_per_gpu)
        return t


def non_expert_work(meta: TraceMetadata, context_tokens: int = DEFAULT_CONTEXT_TOKENS,
                    weight_bytes: int = BF16_BYTES) -> NonExpertWork:
    """Estimate non-expert FLOPs per token and weight bytes from the trace metadata (2 FLOPs per weight per
    token)."""
    notes = []
    h = meta.hidden_size
    layers = meta.num_hidden_layers
    if meta.num_attention_heads and meta.head_dim:
        q_dim = meta.num_attention_heads * meta.head_dim
        kv_dim = (meta.num_key_value_heads or meta.num_attention_heads) * meta.head_dim
        attn_params = h * q_dim * 2 + h * kv_dim * 2  # q and o, k and v projections
    else:
        q_dim = h
        attn_params = 4 * h * h
        notes.append("attention heads missing from metadata: assumed 4 x hidden^2 projection weights per "
                     "layer")
    # scores and weighted sum: 2 matmuls of q_dim x context per token per layer, 2 FLOPs per multiply-add
    attn_score_flops = 4 * q_dim * context_tokens * layers
    notes.append(f"attention over a context of {context_tokens} tokens per token")
    dense_layers = layers - meta.num_moe_layers
    ffn_mats = expert_matrices(meta)
    dense_params = dense_layers * ffn_mats * h * meta.dense_intermediate_size
    shared_params = (meta.num_moe_layers * meta.num_shared_experts * ffn_mats * h
                     * meta.shared_expert_intermediate_size)
    router_params = meta.num_moe_layers * h * meta.num_experts
    lm_head = h * meta.vocab_size
    if not meta.vocab_size:
        notes.append("vocab size missing from metadata: LM head and embeddings left out")
    per_token_params = layers * attn_params + dense_params + shared_params + router_params + lm_head
    flops = 2.0 * per_token_params + attn_score_flops
    embeddings = h * meta.vocab_size  # input embedding table (read sparsely, but resident)
    total_bytes = float((per_token_params + embeddings) * weight_bytes)
    return NonExpertWork(flops, total_bytes, tuple(notes), meta, context_tokens)
