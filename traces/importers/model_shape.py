"""The model half of an imported trace's metadata: shapes from a preset (`--model`) or a Hugging Face
config.json (`--config`), router semantics from the recorder's adapters, provenance from the import.

A dump holds routing only; the replay and the cost model also need layer counts, expert sizes and router
behaviour, which come from here. Only `metadata_from_config` imports torch (through recorder.routers).
"""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace
from typing import Any

from traces.errors import InputError, read_json
from traces.presets import preset_metadata
from traces.schema import TraceMetadata


def _first(cfg: dict[str, Any], *names: str, default: Any = None) -> Any:
    for name in names:
        if cfg.get(name) is not None:
            return cfg[name]
    return default


def moe_layers_of(cfg: dict[str, Any], num_layers: int) -> list[int]:
    """Decoder layers that are MoE: DeepSeek's first_k_dense_replace, Qwen's decoder_sparse_step /
    mlp_only_layers."""
    first_dense = int(_first(cfg, "first_k_dense_replace", default=0) or 0)
    step = int(_first(cfg, "decoder_sparse_step", default=1) or 1)
    dense_only = set(_first(cfg, "mlp_only_layers", default=[]) or [])
    return [i for i in range(first_dense, num_layers) if (i + 1) % step == 0 and i not in dense_only]


def metadata_from_config(path: str | Path, **fields: Any) -> TraceMetadata:
    """TraceMetadata from a Hugging Face config.json; `fields` set provenance and column keys."""
    from recorder.routers import ADAPTERS, routing_semantics

    p = Path(path)
    cfg = read_json(p, "a JSON config")
    if not isinstance(cfg, dict):
        raise InputError(f"{p}: a config.json holds one JSON object")
    if isinstance(cfg.get("text_config"), dict):  # multimodal wrappers keep the language model's shapes here
        cfg = {**cfg, **cfg["text_config"]}
    model_type = str(cfg.get("model_type", "unknown"))
    layers = int(_first(cfg, "num_hidden_layers", default=0))
    experts = int(_first(cfg, "num_experts", "num_local_experts", "n_routed_experts", "moe_num_experts",
                         default=0))
    top_k = int(_first(cfg, "num_experts_per_tok", "moe_top_k", "top_k", "num_experts_per_token", default=0))
    hidden = int(_first(cfg, "hidden_size", default=0))
    for name, value in (("num_hidden_layers", layers), ("number of experts", experts), ("top-k", top_k),
                        ("hidden_size", hidden)):
        if value <= 0:
            raise InputError(f"{p}: config does not give the model's {name}")
    expert_size = int(_first(cfg, "moe_intermediate_size", "expert_intermediate_size", "intermediate_size",
                             default=0))
    moe_layers = moe_layers_of(cfg, layers)
    n_shared, shared_size = 0, 0
    if cfg.get("shared_expert_intermediate_size"):  # Qwen-MoE: one gated MLP
        n_shared, shared_size = 1, int(cfg["shared_expert_intermediate_size"])
    elif cfg.get("n_shared_experts"):
        n_shared, shared_size = int(cfg["n_shared_experts"]), expert_size
    scoring, norm = routing_semantics(model_type, SimpleNamespace(**cfg))
    adapter = ADAPTERS.get(model_type)
    router = adapter.router_names[0] if adapter else "mlp.gate"
    heads = int(_first(cfg, "num_attention_heads", default=0))
    notes: dict[str, Any] = {"config": str(p)}
    if int(_first(cfg, "n_group", default=1) or 1) > 1:
        notes.update(expert_groups=int(cfg["n_group"]), topk_groups=int(_first(cfg, "topk_group", default=1)))
    if adapter is not None and adapter.softmax_over_top_k:
        notes["softmax_over_top_k"] = True
    return TraceMetadata(
        model_id=str(cfg.get("_name_or_path") or p.parent.name or p.stem), model_type=model_type,
        num_hidden_layers=layers, moe_layers=moe_layers,
        moe_module_names=[f"model.layers.{i}.{router}" for i in moe_layers],
        num_experts=experts, top_k=top_k, hidden_size=hidden, expert_intermediate_size=expert_size,
        num_shared_experts=n_shared, shared_expert_intermediate_size=shared_size,
        router_scoring=scoring, norm_topk_prob=norm,
        routed_scaling_factor=float(_first(cfg, "routed_scaling_factor", default=1.0)),
        vocab_size=int(_first(cfg, "vocab_size", default=0)), num_attention_heads=heads,
        num_key_value_heads=int(_first(cfg, "num_key_value_heads", default=heads)),
        head_dim=int(_first(cfg, "head_dim", default=hidden // heads if heads else 0)),
        dense_intermediate_size=int(cfg.get("intermediate_size", 0)) if len(moe_layers) < layers else 0,
        model_dtype=str(_first(cfg, "torch_dtype", "dtype", default="bfloat16")),
        notes={**notes, **fields.pop("notes", {})}, **fields,
    )


def import_metadata(*, model: str | None, config: str | None, source: str, command_line: str = "",
                    notes: dict[str, Any] | None = None) -> TraceMetadata:
    """Metadata for an imported trace: exactly one of `model` (a preset name) or `config` (a config.json
    path)."""
    if (model is None) == (config is None):
        raise InputError("give the model's shapes with exactly one of --model PRESET or --config config.json")
    fields: dict[str, Any] = dict(source=source, command_line=command_line, has_weights=False,
                                  has_token_ids=False, notes=notes or {})
    if model is not None:
        return preset_metadata(model, **fields)
    assert config is not None
    return metadata_from_config(config, **fields)
