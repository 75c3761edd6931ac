"""Recorded ids and weights equal routing computed independently (NumPy, from each router's inputs and
weights)."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import torch

from recorder import MoEProfiler
from recorder.builtin_models import build_builtin_model
from recorder.reference import reference_routing


def _tiny_extra(name: str):
    from transformers import AutoModelForCausalLM, GptOssConfig, PretrainedConfig, Qwen3MoeConfig

    common: dict[str, Any] = dict(vocab_size=320, hidden_size=64, num_attention_heads=4,
                                  num_key_value_heads=4, max_position_embeddings=256)
    cfg: PretrainedConfig
    if name == "qwen3_moe":
        cfg = Qwen3MoeConfig(  # type: ignore[call-arg]
            intermediate_size=96, moe_intermediate_size=32, num_hidden_layers=2, num_experts=8,
            num_experts_per_tok=2, norm_topk_prob=True, head_dim=16, **common)
    else:
        cfg = GptOssConfig(intermediate_size=32, num_hidden_layers=2, num_local_experts=8,
                           num_experts_per_tok=2, head_dim=16, layer_types=["full_attention"] * 2, **common)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg).eval()
    if name == "gpt_oss":
        with torch.no_grad():
            for layer in model.model.layers:
                layer.mlp.router.bias.normal_(0, 0.1)
    return model


def _model(name: str):
    if name in ("qwen3_moe", "gpt_oss"):
        return _tiny_extra(name)
    model = build_builtin_model(name, torch.device("cpu"), torch.float32)
    # a non-zero correction bias, so choosing and weighing differ as in DeepSeek-V3
    if name == "deepseek-tiny":
        torch.manual_seed(1)
        with torch.no_grad():
            for layer in model.model.layers[1:]:
                layer.mlp.gate.e_score_correction_bias.copy_(torch.randn(16) * 0.05)
    return model


def _reference(name: str, module: Any, hidden: np.ndarray,
               model) -> tuple[np.ndarray, np.ndarray]:
    cfg = model.config
    w = module.weight.detach().double().numpy()
    k = cfg.num_experts_per_tok
    if name == "deepseek-tiny":
        return reference_routing(hidden, w, k, scoring="sigmoid", norm_topk_prob=cfg.norm_topk_prob,
                                 correction_bias=module.e_score_correction_bias.double().numpy(),
                                 n_group=cfg.n_group, topk_group=cfg.topk_group,
                                 scaling=cfg.routed_scaling_factor)
    if name == "gpt_oss":
        return reference_routing(hidden, w, k, bias=module.bias.detach().double().numpy(),
                                 softmax_over_top_k=True)
    norm = name in ("mixtral-tiny",) or bool(getattr(cfg, "norm_topk_prob", False))
    return reference_routing(hidden, w, k, norm_topk_prob=norm)


def _sorted_rows(ids: np.ndarray, weights: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    order = np.argsort(ids, axis=-1)
    return np.take_along_axis(ids, order, -1), np.take_along_axis(weights, order, -1)


@pytest.mark.parametrize("name", ["olmoe-tiny", "mixtral-tiny", "qwen-moe-tiny", "deepseek-tiny", "qwen3_moe",
                                  "gpt_oss"])
def test_recorded_routing_equals_independent_computation(name: str) -> None:
    model = _model(name)
    prof = MoEProfiler(model)
    inputs: dict[int, list[np.ndarray]] = {i: [] for i in range(prof.layout.num_layers)}
    taps = [
        site.module.register_forward_pre_hook(
            lambda m, args, i=i: inputs[i].append(args[0].reshape(-1, args[0].shape[-1]).double().numpy()))
        for i, site in enumerate(prof.layout.sites)
    ]
    gen = torch.Generator().manual_seed(7)
    with prof, torch.no_grad():
        model(input_ids=torch.randint(0, 256, (1, 20), generator=gen))
        model(input_ids=torch.randint(0, 256, (2, 9), generator=gen))
    for tap in taps:
        tap.remove()
    chunk = prof.trace()
    assert chunk.num_tokens == 20 + 18
    assert chunk.expert_ids is not None and chunk.expert_weights is not None
    for i, site in enumerate(prof.layout.sites):
        hidden = np.concatenate(inputs[i])
        ref_ids, ref_w = _reference(name, site.module, hidden, model)
        got_ids = chunk.expert_ids[:, i].astype(np.int64)
        got_w = chunk.expert_weights[:, i].astype(np.float64)
        if name != "deepseek-tiny":  # DeepSeek's top-k is unsorted; elsewhere the router's order is kept
            np.testing.assert_array_equal(got_ids, ref_ids)
        a_ids, a_w = _sorted_rows(got_ids, got_w)
        b_ids, b_w = _sorted_rows(ref_ids, ref_w)
        np.testing.assert_array_equal(a_ids, b_ids)
        np.testing.assert_allclose(a_w, b_w, atol=2e-3, rtol=2e-3)


def test_olmoe_matches_output_router_logits() -> None:
    """Second route to the truth: the model's own output_router_logits plus a top-k of our own."""
    model = build_builtin_model("olmoe-tiny", torch.device("cpu"), torch.float32)
    ids = torch.randint(0, 256, (1, 30), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        logits = model(input_ids=ids, output_router_logits=True).router_logits
    with MoEProfiler(model) as prof, torch.no_grad():
        model(input_ids=ids)
    chunk = prof.trace()
    assert chunk.expert_ids is not None and chunk.expert_weights is not None
    for layer, lg in enumerate(logits):
        p = torch.softmax(lg.double(), -1).numpy()
        top = np.argsort(-p, axis=-1)[:, :4]
        np.testing.assert_array_equal(chunk.expert_ids[:, layer], top)
        np.testing.assert_allclose(chunk.expert_weights[:, layer], np.take_along_axis(p, top, -1), atol=1e-3)
