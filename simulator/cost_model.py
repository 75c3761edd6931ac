"""The cost model's constants and small formulas (docs/cost-model.md explains each, with sources).

Peak hardware figures live in hardware.py; this module turns them into the effective rates the kernels use, and
estimates the model's non-expert work and memory from the trace metadata. No I/O.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from simulator import kernels as K
from simulator.hardware import GpuSpec
from traces.schema import TraceMetadata

# ../shared/reference/hardware.md "Measured here": bf16 8192^3 matmul 780-798 TFLOP/s on H100 (peak 989).
MATMUL_EFFICIENCY = 790 / 989
# Same file: device-to-device copy about 3.0 TB/s on H100 (peak 3.35 TB/s).
HBM_EFFICIENCY = 3.0 / 3.35
# DeepEP normal kernels, intranode EP8 on H800: dispatch 153 GB/s, combine 158 GB/s, against H800 NVLink's
# 200 GB/s per direction (400 GB/s bidirectional). The H100 NCCL all-reduce bus bandwidth measured here, 355 of
# 450 GB/s (0.79), agrees.
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
# Default per-GPU batches swept by `plan` (tokens per GPU per step; docs/cost-model.md "Batch per GPU" says why):
# decode-sized around DeepEP's low-latency setting of 128 tokens per GPU, prefill-sized around its normal-kernel
# setting of 4096, and for mixed traffic a decode-sized, a middle and a chunked-prefill-sized batch.
DEFAULT_TOKENS_PER_GPU = {"decode": (32, 128, 512), "prefill": (1024, 4096, 16384), "all": (128, 1024, 4096)}


def cost_row(gpu: GpuSpec) -> np.ndarray:
    """[8] effective rates of one GPU in the kernels' C_* column order."""
    row = np.zeros(K.NUM_COST_COLUMNS)
    row[K.C_FLOPS] = gpu.bf16_flops * MATMUL_EFFICIENCY
    row[K.C_HBM] = gpu.hbm_bandwidth * HBM_EFFICIENCY
    row[K.C_SU_DISPATCH] = gpu.scale_up_bandwidth * SCALE_UP_DISPATCH_EFFICIENCY
    row[K.C_SU_COMBINE] = gpu.scale_up_bandwidth * SCALE_UP_COMBINE_EFFICIENCY
    row[K.C_SO_DISPATCH] = gpu.scale_out_bandwidth * SCALE_OUT_DISPATCH_EFFICIENCY
    row[K.C_SO_COMBINE] = gpu.scale_out_bandwidth * SCALE_OUT_COMBINE_EFFICIENCY
    row[K.C_SU_LAT] = gpu.scale_up_latency
    row[K.C_SO_LAT] = gpu.scale_out_latency
    return row


def cost_matrix(gpus: list[GpuSpec]) -> np.ndarray:
    """[H, 8] cost rows for the kernels."""
    return np.stack([cost_row(g) for g in gpus])


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
    """Work outside the routed experts, per token and per GPU (data-parallel attention: each GPU holds a copy)."""

    flops_per_token: float  # attention projections and scores, dense FFN layers, shared experts, routers, LM head
    weight_bytes: float  # all non-expert weights (embeddings included), read once per step by every GPU
    assumptions: tuple[str, ...]

    def step_seconds(self, gpu: GpuSpec, tokens_per_gpu: float) -> float:
        """Roofline of one step's non-expert work on one GPU."""
        return float(self.step_seconds_array(gpu, np.asarray([tokens_per_gpu], dtype=np.float64))[0])

    def step_seconds_array(self, gpu: GpuSpec, tokens_per_gpu: np.ndarray) -> np.ndarray:
        """The same roofline for each step [n] (tokens per GPU of each step)."""
        compute = self.flops_per_token * tokens_per_gpu / (gpu.bf16_flops * MATMUL_EFFICIENCY)
        reads = self.weight_bytes / (gpu.hbm_bandwidth * HBM_EFFICIENCY)
        return np.maximum(compute, reads)


def non_expert_work(meta: TraceMetadata, context_tokens: int = DEFAULT_CONTEXT_TOKENS,
                    weight_bytes: int = BF16_BYTES) -> NonExpertWork:
    """Estimate non-expert FLOPs per token and weight bytes from the trace metadata (2 FLOPs per weight per token)."""
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
        notes.append("attention heads missing from metadata: assumed 4 x hidden^2 projection weights per layer")
    # scores and weighted sum: 2 matmuls of q_dim x context per token per layer, 2 FLOPs per multiply-add
    attn_score_flops = 4 * q_dim * context_tokens * layers
    notes.append(f"attention over a context of {context_tokens} tokens per token")
    dense_layers = layers - meta.num_moe_layers
    ffn_mats = expert_matrices(meta)
    dense_params = dense_layers * ffn_mats * h * meta.dense_intermediate_size
    shared_params = meta.num_moe_layers * meta.num_shared_experts * ffn_mats * h * meta.shared_expert_intermediate_size
    router_params = meta.num_moe_layers * h * meta.num_experts
    lm_head = h * meta.vocab_size
    if not meta.vocab_size:
        notes.append("vocab size missing from metadata: LM head and embeddings left out")
    per_token_params = layers * attn_params + dense_params + shared_params + router_params + lm_head
    flops = 2.0 * per_token_params + attn_score_flops
    embeddings = h * meta.vocab_size  # input embedding table (read sparsely, but resident)
    total_bytes = float((per_token_params + embeddings) * weight_bytes)
    return NonExpertWork(flops, total_bytes, tuple(notes))
