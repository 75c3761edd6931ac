"""Model shape presets: the real published shapes of well-known MoE models, as TraceMetadata factories.

Used by `moe-sim synth --model NAME` (synthetic traces with the right shapes) and by anyone who wants a
model's shape without downloading its config. Values come from each model's released config.json on the
Hugging Face hub (cited per preset) and were cross-checked against the transformers 5.24 modeling code (router
behaviour, module names). Constructors never touch the disk or the network.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from traces.errors import InputError
from traces.schema import TraceMetadata


@dataclass(frozen=True)
class ModelPreset:
    """The shape and router behaviour of one MoE model."""

    name: str  # short name used on the command line
    model_id: str  # Hugging Face hub id
    model_type: str  # transformers config.model_type
    num_hidden_layers: int  # all decoder layers, dense ones included
    first_moe_layer: int  # layers before this one are dense (DeepSeek-V3: first_k_dense_replace = 3)
    num_experts: int  # routed experts per MoE layer
    top_k: int  # routed experts per token
    hidden_size: int
    expert_intermediate_size: int  # FFN size of one routed expert
    router_scoring: str  # "softmax" or "sigmoid"
    norm_topk_prob: bool  # top-k weights renormalised to sum to 1 (before routed_scaling_factor)
    vocab_size: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    num_shared_experts: int = 0
    shared_expert_intermediate_size: int = 0  # FFN size of one shared expert
    dense_intermediate_size: int = 0  # FFN size of the dense layers (0: there are none)
    routed_scaling_factor: float = 1.0  # multiplies the recorded top-k weights (DeepSeek-V3: 2.5)
    # group-limited routing: experts split into this many groups (DeepSeek-V3: n_group 8)
    expert_groups: int = 1
    topk_groups: int = 1  # a token may only use experts from this many groups (DeepSeek-V3: topk_group 4)
    # module path of a layer's router in transformers 5.x
    router_module: str = "model.layers.{layer}.mlp.gate"
    model_dtype: str = "bfloat16"

    @property
    def moe_layers(self) -> list[int]:
        return list(range(self.first_moe_layer, self.num_hidden_layers))


PRESETS: dict[str, ModelPreset] = {
    # allenai/OLMoE-1B-7B-0924 config.json: 16 layers, hidden 2048, intermediate_size 1024 (per expert;
    # OlmoeConfig's default of 2048 is NOT the released value), 64 experts, num_experts_per_tok 8,
    # norm_topk_prob false (weights are un-renormalised softmax probabilities), vocab 50304, 16 heads
    # (head_dim 2048/16 = 128), 16 KV heads.
    "olmoe-1b-7b": ModelPreset(
        name="olmoe-1b-7b",
        model_id="allenai/OLMoE-1B-7B-0924",
        model_type="olmoe",
        num_hidden_layers=16,
        first_moe_layer=0,
        num_experts=64,
        top_k=8,
        hidden_size=2048,
        expert_intermediate_size=1024,
        router_scoring="softmax",
        norm_topk_prob=False,
        vocab_size=50304,
        num_attention_heads=16,
        num_key_value_heads=16,
        head_dim=128,
    ),
    # mistralai/Mixtral-8x7B-v0.1 config.json: 32 layers, hidden 4096, intermediate_size 14336 (per expert),
    # num_local_experts 8, num_experts_per_tok 2, vocab 32000, 32 heads, 8 KV heads (head_dim 128). The router
    # takes softmax over all 8 logits, keeps the top 2 and renormalises them (MixtralTopKRouter), i.e.
    # norm_topk_prob.
    "mixtral-8x7b": ModelPreset(
        name="mixtral-8x7b",
        model_id="mistralai/Mixtral-8x7B-v0.1",
        model_type="mixtral",
        num_hidden_layers=32,
        first_moe_layer=0,
        num_experts=8,
        top_k=2,
        hidden_size=4096,
        expert_intermediate_size=14336,
        router_scoring="softmax",
        norm_topk_prob=True,
        vocab_size=32000,
        num_attention_heads=32,
        num_key_value_heads=8,
        head_dim=128,
    ),
    # Qwen/Qwen1.5-MoE-A2.7B config.json: 24 layers, hidden 2048, 60 experts, num_experts_per_tok 4,
    # moe_intermediate_size 1408, shared_expert_intermediate_size 5632, norm_topk_prob false, vocab 151936,
    # 16 heads and 16 KV heads (head_dim 128), decoder_sparse_step 1 and no mlp_only_layers (every layer is
    # MoE). The Qwen blog describes the shared part as 4 shared experts of 1408 (= 5632); transformers
    # implements it as ONE gated MLP of 5632, which is what we record: 1 shared expert of 5632 (same FLOPs and
    # bytes either way).
    "qwen1.5-moe-a2.7b": ModelPreset(
        name="qwen1.5-moe-a2.7b",
        model_id="Qwen/Qwen1.5-MoE-A2.7B",
        model_type="qwen2_moe",
        num_hidden_layers=24,
        first_moe_layer=0,
        num_experts=60,
        top_k=4,
        hidden_size=2048,
        expert_intermediate_size=1408,
        num_shared_experts=1,
        shared_expert_intermediate_size=5632,
        router_scoring="softmax",
        norm_topk_prob=False,
        vocab_size=151936,
        num_attention_heads=16,
        num_key_value_heads=16,
        head_dim=128,
    ),
    # deepseek-ai/DeepSeek-V3 config.json: 61 layers, first_k_dense_replace 3 (layers 0-2 dense with
    # intermediate_size 18432; 58 MoE layers), n_routed_experts 256, num_experts_per_tok 8, n_shared_experts
    # 1, hidden 7168, moe_intermediate_size 2048, scoring_func sigmoid, norm_topk_prob true,
    # routed_scaling_factor 2.5 (applied to the top-k weights by the router), n_group 8, topk_group 4, vocab
    # 129280, 128 heads (MLA: qk_nope_head_dim 128 + qk_rope_head_dim 64 = 192 for q/k, v_head_dim 128; we
    # record the q/k head dim 192). The released weights are FP8 (e4m3) with bf16 activations; the dtype below
    # is the activation dtype.
    "deepseek-v3": ModelPreset(
        name="deepseek-v3",
        model_id="deepseek-ai/DeepSeek-V3",
        model_type="deepseek_v3",
        num_hidden_layers=61,
        first_moe_layer=3,
        num_experts=256,
        top_k=8,
        hidden_size=7168,
        expert_intermediate_size=2048,
        num_shared_experts=1,
        shared_expert_intermediate_size=2048,
        dense_intermediate_size=18432,
        router_scoring="sigmoid",
        norm_topk_prob=True,
        routed_scaling_factor=2.5,
        expert_groups=8,
        topk_groups=4,
        vocab_size=129280,
        num_attention_heads=128,
        num_key_value_heads=128,
        head_dim=192,
    ),
    # Qwen/Qwen3-30B-A3B config.json: 48 layers, hidden 2048, 128 experts, num_experts_per_tok 8,
    # moe_intermediate_size 768, norm_topk_prob true, no shared expert, decoder_sparse_step 1 and no
    # mlp_only_layers (every layer is MoE), vocab 151936, 32 heads, 4 KV heads, head_dim 128 (set explicitly,
    # not hidden / heads).
    "qwen3-30b-a3b": ModelPreset(
        name="qwen3-30b-a3b",
        model_id="Qwen/Qwen3-30B-A3B",
        model_type="qwen3_moe",
        num_hidden_layers=48,
        first_moe_layer=0,
        num_experts=128,
        top_k=8,
        hidden_size=2048,
        expert_intermediate_size=768,
        router_scoring="softmax",
        norm_topk_prob=True,
        vocab_size=151936,
        num_attention_heads=32,
        num_key_value_heads=4,
        head_dim=128,
    ),
    # openai/gpt-oss-120b config.json: 36 layers, hidden 2880, intermediate_size 2880 (per expert),
    # num_local_experts 128, num_experts_per_tok 4, vocab 201088, 64 heads, 8 KV heads, head_dim 64. The
    # router (GptOssTopKRouter) takes the top 4 logits and a softmax over those 4 only, so the weights sum to
    # 1 (norm_topk_prob). Experts are gated (gate, up, down: SwiGLU-shaped, clamped) with biases; the released
    # expert weights are MXFP4 with bf16 activations, and the dtype below is the activation dtype. The router
    # is `mlp.router`, not `mlp.gate`.
    "gpt-oss-120b": ModelPreset(
        name="gpt-oss-120b",
        model_id="openai/gpt-oss-120b",
        model_type="gpt_oss",
        num_hidden_layers=36,
        first_moe_layer=0,
        num_experts=128,
        top_k=4,
        hidden_size=2880,
        expert_intermediate_size=2880,
        router_scoring="softmax",
        norm_topk_prob=True,
        vocab_size=201088,
        num_attention_heads=64,
        num_key_value_heads=8,
        head_dim=64,
        router_module="model.layers.{layer}.mlp.router",
    ),
}
# Qwen/Qwen3-235B-A22B config.json: as Qwen3-30B-A3B (128 experts, top-8, norm_topk_prob, every layer MoE, 4
# KV heads of 128) with 94 layers, hidden 4096, moe_intermediate_size 1536 and 64 heads.
PRESETS["qwen3-235b-a22b"] = dataclasses.replace(
    PRESETS["qwen3-30b-a3b"], name="qwen3-235b-a22b", model_id="Qwen/Qwen3-235B-A22B", num_hidden_layers=94,
    hidden_size=4096, expert_intermediate_size=1536, num_attention_heads=64)
# openai/gpt-oss-20b config.json: as gpt-oss-120b with 24 layers and num_local_experts 32.
PRESETS["gpt-oss-20b"] = dataclasses.replace(
    PRESETS["gpt-oss-120b"], name="gpt-oss-20b", model_id="openai/gpt-oss-20b", num_hidden_layers=24,
    num_experts=32)

ALIASES = {
    "olmoe": "olmoe-1b-7b",
    "allenai/olmoe-1b-7b-0924": "olmoe-1b-7b",
    "mixtral": "mixtral-8x7b",
    "mistralai/mixtral-8x7b-v0.1": "mixtral-8x7b",
    "qwen1.5-moe": "qwen1.5-moe-a2.7b",
    "qwen/qwen1.5-moe-a2.7b": "qwen1.5-moe-a2.7b",
    "deepseek": "deepseek-v3",
    "deepseek-ai/deepseek-v3": "deepseek-v3",
    "qwen3-moe": "qwen3-30b-a3b",
    "qwen/qwen3-30b-a3b": "qwen3-30b-a3b",
    "qwen/qwen3-235b-a22b": "qwen3-235b-a22b",
    "gpt-oss": "gpt-oss-120b",
    "openai/gpt-oss-120b": "gpt-oss-120b",
    "openai/gpt-oss-20b": "gpt-oss-20b",
}


def get_preset(name: str) -> ModelPreset:
    """The preset called `name` (case-insensitive; hub ids and short aliases accepted)."""
    key = name.lower()
    key = ALIASES.get(key, key)
    if key not in PRESETS:
        raise InputError(f"--model: unknown model preset {name!r}; choose one of {', '.join(PRESETS)}")
    return PRESETS[key]


def preset_metadata(name: str, **overrides: Any) -> TraceMetadata:
    """TraceMetadata with the preset's shapes; keyword overrides set any other TraceMetadata field.

    >>> preset_metadata("olmoe-1b-7b", source="synthetic", has_token_ids=False).num_moe_layers
    16
    """
    p = get_preset(name)
    notes: dict[str, Any] = {"preset": p.name}
    if p.expert_groups > 1:
        notes.update(expert_groups=p.expert_groups, topk_groups=p.topk_groups)
    fields: dict[str, Any] = dict(
        model_id=p.model_id,
        model_type=p.model_type,
        num_hidden_layers=p.num_hidden_layers,
        moe_layers=p.moe_layers,
        moe_module_names=[p.router_module.format(layer=i) for i in p.moe_layers],
        num_experts=p.num_experts,
        top_k=p.top_k,
        hidden_size=p.hidden_size,
        expert_intermediate_size=p.expert_intermediate_size,
        num_shared_experts=p.num_shared_experts,
        shared_expert_intermediate_size=p.shared_expert_intermediate_size,
        router_scoring=p.router_scoring,
        norm_topk_prob=p.norm_topk_prob,
        routed_scaling_factor=p.routed_scaling_factor,
        expert_activation="swiglu",
        vocab_size=p.vocab_size,
        num_attention_heads=p.num_attention_heads,
        num_key_value_heads=p.num_key_value_heads,
        head_dim=p.head_dim,
        dense_intermediate_size=p.dense_intermediate_size,
        model_dtype=p.model_dtype,
        notes=notes,
    )
    known = {f.name for f in dataclasses.fields(TraceMetadata)}
    unknown = sorted(set(overrides) - known)
    if unknown:
        raise TypeError(f"preset_metadata: unknown TraceMetadata field(s) {', '.join(unknown)}")
    if "notes" in overrides:
        notes = {**notes, **overrides.pop("notes")}
        fields["notes"] = notes
    fields.update(overrides)
    return TraceMetadata(**fields)
