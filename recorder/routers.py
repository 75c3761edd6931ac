"""Find a model's MoE routers and learn their conventions.

Routers are found by model type (an adapter names the router's attribute and the routing semantics) with a
structural fallback for unknown models: a child named `gate` or `router` of a block that also has `experts`,
inside `layers.<i>`. A probe call on random input tells which output convention the installed transformers
uses:

- "3-tuple": (logits [T, E], top-k weights [T, K], ids [T, K])  -- transformers 5.x
- "2-tuple": (dense scores [T, E], ids [T, K])                   -- early transformers 5.0 releases
- "logits":  one tensor [T, E] from an nn.Linear gate; top-k is done by the block (transformers 4.x)

and whether the first output is raw logits or probabilities (transformers 5.0 returned softmax probabilities).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from traces.errors import InputError

_LAYER_RE = re.compile(r"(?:^|\.)layers\.(\d+)\.")


@dataclass(frozen=True)
class Adapter:
    """How one model family names its router and what its top-k weights mean."""

    router_names: tuple[str, ...]  # router module path relative to the decoder layer
    scoring: str = "softmax"  # "softmax" or "sigmoid"
    always_normalised: bool = False  # top-k weights sum to 1 whatever the config says (Mixtral, GPT-OSS)
    softmax_over_top_k: bool = False  # weights are a softmax over the k largest logits only (GPT-OSS)


ADAPTERS: dict[str, Adapter] = {
    "olmoe": Adapter(("mlp.gate",)),
    "flex_olmo": Adapter(("mlp.gate",)),
    "mixtral": Adapter(("mlp.gate", "block_sparse_moe.gate"), always_normalised=True),
    "minimax": Adapter(("mlp.gate", "block_sparse_moe.gate"), always_normalised=True),
    "qwen2_moe": Adapter(("mlp.gate",)),
    "qwen3_moe": Adapter(("mlp.gate",)),
    "qwen3_next": Adapter(("mlp.gate",)),
    "qwen3_5_moe": Adapter(("mlp.gate",)),
    "deepseek_v2": Adapter(("mlp.gate",)),
    "deepseek_v3": Adapter(("mlp.gate",), scoring="sigmoid"),
    "glm4_moe": Adapter(("mlp.gate",), scoring="sigmoid"),
    "dots1": Adapter(("mlp.gate",), scoring="sigmoid"),
    "minimax_m2": Adapter(("mlp.gate",), scoring="sigmoid"),
    "ernie4_5_moe": Adapter(("mlp.gate",)),
    "hunyuan_v1_moe": Adapter(("mlp.gate",)),
    "phimoe": Adapter(("mlp.router", "block_sparse_moe.router")),
    "granitemoe": Adapter(("block_sparse_moe.router",), always_normalised=True),
    "gpt_oss": Adapter(("mlp.router",), always_normalised=True, softmax_over_top_k=True),
    "llama4_text": Adapter(("feed_forward.router",), scoring="sigmoid"),
}


@dataclass(frozen=True)
class RouterSite:
    """One MoE layer's router."""

    layer: int  # decoder-layer index
    name: str  # module path, e.g. "model.layers.3.mlp.gate"
    module: nn.Module


@dataclass
class RouterLayout:
    """Every router of a model, the output convention and the routing semantics (for the trace metadata)."""

    sites: list[RouterSite]
    adapter: str  # model type of the adapter used, or "structural"
    convention: str  # "3-tuple", "2-tuple" or "logits"
    first_output: str  # "logits" or "probabilities"
    dense_scores: bool  # 2-tuple only: the scores hold only the chosen weights (zeros elsewhere)
    model_type: str
    num_hidden_layers: int
    num_experts: int
    top_k: int
    hidden_size: int
    expert_intermediate_size: int
    num_shared_experts: int
    shared_expert_intermediate_size: int
    dense_intermediate_size: int
    router_scoring: str
    norm_topk_prob: bool
    routed_scaling_factor: float

    @property
    def num_layers(self) -> int:
        return len(self.sites)


def _cfg(config: Any, *names: str, default: Any = None) -> Any:
    for name in names:
        value = getattr(config, name, None)
        if value is not None:
            return value
    return default


def text_config(model: nn.Module) -> Any:
    config = model.config
    get = getattr(config, "get_text_config", None)
    return get() if callable(get) else config


def routing_semantics(model_type: str, config: Any) -> tuple[str, bool]:
    """(router scoring, top-k weights renormalised) for a model type and its (text) config object."""
    adapter = ADAPTERS.get(model_type)
    scoring = str(_cfg(config, "scoring_func", default=adapter.scoring if adapter else "softmax"))
    if scoring not in ("softmax", "sigmoid"):
        scoring = "softmax"
    norm = bool(adapter.always_normalised) if adapter else False
    return scoring, norm or bool(_cfg(config, "norm_topk_prob", default=False))


def topk_from_logits(logits: torch.Tensor, top_k: int, *, norm_topk_prob: bool,
                     softmax_over_top_k: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """A softmax router's choice from its raw logits [T, E]: (weights [T, K] float32, ids [T, K]).

    softmax over all experts, the k most probable, renormalised when norm_topk_prob; or (GPT-OSS) the k
    largest logits and a softmax over those k. Ties go to the lower expert id, as torch.topk breaks them.
    """
    if softmax_over_top_k:
        top, ids = torch.topk(logits.float(), top_k, dim=-1)
        return torch.softmax(top, dim=-1), ids
    probs = torch.softmax(logits.float(), dim=-1)
    weights, ids = torch.topk(probs, top_k, dim=-1)
    if norm_topk_prob:
        weights = weights / weights.sum(-1, keepdim=True)
    return weights, ids


def find_router_sites(model: nn.Module, model_type: str) -> tuple[list[RouterSite], str]:
    """Routers by the model type's adapter, else by structure. Returns (sites sorted by layer, adapter
    name)."""
    modules = dict(model.named_modules())
    adapter = ADAPTERS.get(model_type)
    if adapter is not None:
        sites = [
            RouterSite(int(m.group(1)), name, module)
            for name, module in modules.items()
            if (m := _LAYER_RE.search(name)) and name[m.end():] in adapter.router_names
        ]
        if sites:
            return sorted(sites, key=lambda s: s.layer), model_type
    sites = []
    for name, module in modules.items():
        parent_name, _, leaf = name.rpartition(".")
        m = _LAYER_RE.search(name)
        if leaf not in ("gate", "router") or m is None:
            continue
        parent = modules.get(parent_name)
        if parent is not None and hasattr(parent, "experts"):
            sites.append(RouterSite(int(m.group(1)), name, module))
    return sorted(sites, key=lambda s: s.layer), "structural"


def _expert_intermediate_size(model: nn.Module, site: RouterSite, config: Any) -> int:
    """FFN size of one routed expert: from the expert weights where they are 3-D tensors, else the config."""
    parent_name = site.name.rpartition(".")[0]
    experts = model.get_submodule(parent_name).experts
    down = getattr(experts, "down_proj", None)
    if isinstance(down, torch.Tensor) and down.dim() == 3:
        # [E, H, I] in most families; GPT-OSS stores [E, I, H].
        hidden = int(_cfg(config, "hidden_size"))
        a, b = int(down.shape[1]), int(down.shape[2])
        return b if a == hidden else a
    return int(_cfg(config, "moe_intermediate_size", "expert_intermediate_size", "intermediate_size",
                    default=0))


def _router_param(module: nn.Module) -> torch.Tensor:
    for p in module.parameters():
        return p
    raise InputError(f"router {type(module).__name__} has no parameters to probe")


def probe_router(module: nn.Module, hidden_size: int, top_k: int) -> tuple[str, str, bool]:
    """Call a router once on random input: (convention, first output kind, dense 2-tuple scores)."""
    param = _router_param(module)
    gen = torch.Generator(device="cpu").manual_seed(0)
    x = torch.randn(8, hidden_size, generator=gen).to(device=param.device, dtype=param.dtype)
    with torch.no_grad():
        out = module(x)
    if isinstance(out, torch.Tensor):
        return "logits", "logits", False
    if not isinstance(out, tuple | list) or len(out) not in (2, 3):
        raise InputError(f"router {type(module).__name__} returned {type(out).__name__}; cannot read its "
                         "routing")
    first = out[0].float().reshape(-1, out[0].shape[-1])
    ids = out[-1]
    if ids.dtype.is_floating_point:
        raise InputError(f"router {type(module).__name__}: last output is not integer expert ids")
    in_unit = bool(((first >= 0) & (first <= 1)).all())
    sums_to_one = bool(torch.allclose(first.sum(-1), torch.ones(first.shape[0], device=first.device),
                                      atol=1e-2))
    nonzero = int((first != 0).sum(-1).max())
    scattered = in_unit and nonzero <= top_k
    kind = "probabilities" if in_unit and (sums_to_one or scattered) else "logits"
    if len(out) == 3:
        return "3-tuple", kind, False
    return "2-tuple", kind, scattered


def discover_routers(model: nn.Module) -> RouterLayout:
    """All MoE routers of `model` and their semantics; InputError when the model has none."""
    config = text_config(model)
    model_type = str(_cfg(config, "model_type", default="unknown"))
    sites, adapter_name = find_router_sites(model, model_type)
    if not sites:
        raise InputError(
            f"model {getattr(model.config, 'name_or_path', '') or type(model).__name__} ({model_type}) has "
            "no MoE router (no 'gate' or 'router' module beside 'experts' in its decoder layers)"
        )
    first = sites[0].module
    param = _router_param(first)
    num_experts = int(getattr(first, "num_experts", 0) or param.shape[0])
    top_k = int(getattr(first, "top_k", 0) or _cfg(config, "num_experts_per_tok", "moe_top_k", "top_k",
                                                   default=0))
    if top_k <= 0:
        raise InputError(f"model type {model_type}: cannot tell the router's top-k from the model or its "
                         "config")
    hidden = int(_cfg(config, "hidden_size"))
    convention, first_output, dense_scores = probe_router(first, hidden, top_k)
    scoring, norm = routing_semantics(adapter_name, config)
    if convention == "logits" and scoring != "softmax":
        raise InputError(
            f"model type {model_type}: this transformers version computes top-k outside the router; "
            "only softmax routers are supported there (upgrade transformers)"
        )
    n_layers = int(_cfg(config, "num_hidden_layers", default=len(sites)))
    moe_layers = {s.layer for s in sites}
    n_shared = int(_cfg(config, "n_shared_experts", "num_shared_experts", default=0) or 0)
    expert_size = _expert_intermediate_size(model, sites[0], config)
    shared_size = 0
    if _cfg(config, "shared_expert_intermediate_size") and model_type.startswith("qwen"):
        n_shared, shared_size = 1, int(config.shared_expert_intermediate_size)
    elif n_shared:
        shared_size = int(_cfg(config, "moe_intermediate_size", default=expert_size))
    dense = int(_cfg(config, "intermediate_size", default=0)) if len(moe_layers) < n_layers else 0
    return RouterLayout(
        sites=sites, adapter=adapter_name, convention=convention, first_output=first_output,
        dense_scores=dense_scores, model_type=model_type, num_hidden_layers=n_layers, num_experts=num_experts,
        top_k=top_k, hidden_size=hidden, expert_intermediate_size=expert_size, num_shared_experts=n_shared,
        shared_expert_intermediate_size=shared_size, dense_intermediate_size=dense, router_scoring=scoring,
        norm_topk_prob=norm, routed_scaling_factor=float(_cfg(config, "routed_scaling_factor", default=1.0)),
    )
