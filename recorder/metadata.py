"""Trace metadata for a recorded model: shapes and router semantics from the model, provenance from the
run."""

from __future__ import annotations

import datetime as _dt
from typing import Any

import torch

from recorder.routers import RouterLayout, text_config
from traces.schema import TraceMetadata


def build_metadata(
    model: Any,
    layout: RouterLayout,
    *,
    model_id: str,
    revision: str | None = None,
    token_ids: bool = True,
    save_logits: bool = False,
    prompts_sha256: str | None = None,
    command_line: str = "",
    notes: dict[str, Any] | None = None,
) -> TraceMetadata:
    """Trace metadata from the model, its routers and how it is being recorded."""
    import transformers

    from cli import __version__

    config = text_config(model)
    heads = int(getattr(config, "num_attention_heads", 0) or 0)
    head_dim = int(getattr(config, "head_dim", 0) or (layout.hidden_size // heads if heads else 0))
    experts_impl = getattr(model.config, "_experts_implementation", None)
    dtype = next(model.parameters()).dtype
    return TraceMetadata(
        model_id=model_id,
        model_type=layout.model_type,
        num_hidden_layers=layout.num_hidden_layers,
        moe_layers=[s.layer for s in layout.sites],
        moe_module_names=[s.name for s in layout.sites],
        num_experts=layout.num_experts,
        top_k=layout.top_k,
        hidden_size=layout.hidden_size,
        expert_intermediate_size=layout.expert_intermediate_size,
        num_shared_experts=layout.num_shared_experts,
        shared_expert_intermediate_size=layout.shared_expert_intermediate_size,
        router_scoring=layout.router_scoring,
        norm_topk_prob=layout.norm_topk_prob,
        router_first_output=layout.first_output,
        routed_scaling_factor=layout.routed_scaling_factor,
        expert_activation="swiglu",
        vocab_size=int(getattr(config, "vocab_size", 0) or 0),
        num_attention_heads=heads,
        num_key_value_heads=int(getattr(config, "num_key_value_heads", 0) or heads),
        head_dim=head_dim,
        dense_intermediate_size=layout.dense_intermediate_size,
        model_revision=revision,
        model_dtype=str(dtype).removeprefix("torch."),
        weights_dtype="float16",
        has_token_ids=token_ids,
        has_weights=True,
        has_logits=save_logits,
        source="recorded",
        transformers_version=transformers.__version__,
        torch_version=torch.__version__,
        prompts_sha256=prompts_sha256,
        tool_version=__version__,
        created_at=_dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        command_line=command_line,
        notes={
            "router_convention": layout.convention,
            "router_adapter": layout.adapter,
            "experts_implementation": str(experts_impl) if experts_impl else "default",
            **(notes or {}),
        },
    )
