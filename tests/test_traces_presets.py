"""Model presets carry the published shapes (values checked by hand against each model's config.json)."""

from __future__ import annotations

import pytest

from traces import InputError
from traces.presets import PRESETS, get_preset, preset_metadata


def test_olmoe_shapes() -> None:
    m = preset_metadata("olmoe-1b-7b")
    assert (m.num_hidden_layers, m.num_moe_layers, m.num_experts, m.top_k) == (16, 16, 64, 8)
    assert (m.hidden_size, m.expert_intermediate_size, m.vocab_size) == (2048, 1024, 50304)
    assert (m.num_attention_heads, m.head_dim, m.router_scoring,
            m.norm_topk_prob) == (16, 128, "softmax", False)
    assert m.moe_module_names[3] == "model.layers.3.mlp.gate"
    assert m.flops_per_assignment == 6 * 2048 * 1024  # SwiGLU: 3 matrices, 2 FLOPs per multiply-add


def test_mixtral_qwen_deepseek_shapes() -> None:
    mix = preset_metadata("mixtral-8x7b")
    assert (mix.num_moe_layers, mix.num_experts, mix.top_k, mix.hidden_size) == (32, 8, 2, 4096)
    assert (mix.expert_intermediate_size, mix.num_key_value_heads, mix.norm_topk_prob) == (14336, 8, True)
    qwen = preset_metadata("qwen1.5-moe-a2.7b")
    assert (qwen.num_moe_layers, qwen.num_experts, qwen.top_k,
            qwen.expert_intermediate_size) == (24, 60, 4, 1408)
    assert qwen.num_shared_experts * qwen.shared_expert_intermediate_size == 5632 == 4 * 1408
    assert qwen.vocab_size == 151936 and not qwen.norm_topk_prob
    ds = preset_metadata("deepseek-v3")
    assert ds.num_hidden_layers == 61 and ds.moe_layers == list(range(3, 61))
    assert (ds.num_experts, ds.top_k, ds.num_shared_experts, ds.hidden_size) == (256, 8, 1, 7168)
    assert (ds.expert_intermediate_size, ds.dense_intermediate_size) == (2048, 18432)
    assert (ds.router_scoring, ds.norm_topk_prob, ds.routed_scaling_factor) == ("sigmoid", True, 2.5)
    assert ds.notes["expert_groups"] == 8 and ds.notes["topk_groups"] == 4
    assert ds.id_dtype.itemsize == 1  # 256 experts still fit uint8


def test_lookup_and_overrides() -> None:
    assert (get_preset("OLMoE").name == "olmoe-1b-7b"
            and get_preset("deepseek-ai/DeepSeek-V3").name == "deepseek-v3")
    m = preset_metadata("mixtral", has_token_ids=False, notes={"x": 1})
    assert not m.has_token_ids and m.notes == {"preset": "mixtral-8x7b", "x": 1}
    with pytest.raises(InputError, match="unknown model preset"):
        get_preset("llama")
    with pytest.raises(TypeError, match="unknown TraceMetadata field"):
        preset_metadata("olmoe", colour="red")
    assert len(PRESETS) == 8
    assert (get_preset("openai/gpt-oss-120b").name == "gpt-oss-120b"
            and get_preset("Qwen3-MoE").name == "qwen3-30b-a3b")


def test_qwen3_and_gpt_oss_shapes() -> None:
    q3 = preset_metadata("qwen3-30b-a3b")
    assert (q3.num_moe_layers, q3.num_experts, q3.top_k, q3.hidden_size) == (48, 128, 8, 2048)
    assert (q3.expert_intermediate_size, q3.num_key_value_heads, q3.head_dim,
            q3.norm_topk_prob) == (768, 4, 128, True)
    assert q3.num_shared_experts == 0 and q3.model_type == "qwen3_moe"
    big = preset_metadata("qwen3-235b-a22b")
    assert (big.num_moe_layers, big.hidden_size, big.expert_intermediate_size, big.num_attention_heads) == (
        94, 4096, 1536, 64)
    oss = preset_metadata("gpt-oss-120b")
    assert (oss.num_moe_layers, oss.num_experts, oss.top_k, oss.hidden_size) == (36, 128, 4, 2880)
    assert (oss.expert_intermediate_size, oss.vocab_size, oss.head_dim,
            oss.norm_topk_prob) == (2880, 201088, 64, True)
    assert oss.moe_module_names[5] == "model.layers.5.mlp.router"  # GPT-OSS names its router `router`
    small = preset_metadata("gpt-oss-20b")
    assert (small.num_moe_layers, small.num_experts, small.top_k) == (24, 32, 4)
