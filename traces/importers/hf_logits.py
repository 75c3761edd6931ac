"""Hugging Face `output_router_logits=True` tensors saved with safetensors; top-k is recomputed from the
logits under the model's router semantics (recorder.routers: softmax, renormalised or not, GPT-OSS's softmax
over the top-k logits).

Layout, one file per forward pass (files are steps, in the order given):
- `router_logits.{i}` for MoE layer i = 0..L-1 (the order of `outputs.router_logits`), each [N, E] or [B, S,
  E]; or one `router_logits` tensor [L, N, E];
- optional `input_ids` [B, S] (gives sequences and positions; N = B*S) and `attention_mask` [B, S] (rows with
  0 are padding and are dropped; positions count the kept tokens). Without input_ids the file is one sequence.
safetensors holds raw tensors and a JSON header, nothing executable. Every token is a prefill token.
Shape legend: N tokens of a file, B sequences, S sequence length, L MoE layers, E experts, K top-k.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from traces.errors import InputError
from traces.importers.sink import TraceSink
from traces.schema import PHASE_PREFILL, TraceMetadata


def check_semantics(meta: TraceMetadata) -> bool:
    """Refuse routers whose choice the logits alone do not give; returns softmax_over_top_k."""
    if meta.router_scoring != "softmax":
        raise InputError(f"model type {meta.model_type}: a sigmoid router chooses with a correction bias and "
                         "expert groups that output_router_logits does not carry; import its chosen ids "
                         "instead (--from tabular)")
    return bool(meta.notes.get("softmax_over_top_k", False)) or meta.model_type == "gpt_oss"


def _layer_logits(f: Any, keys: set[str], meta: TraceMetadata, where: str) -> list[Any]:
    if "router_logits" in keys:
        stacked = f.get_tensor("router_logits")
        if stacked.dim() != 3 or stacked.shape[0] != meta.num_moe_layers:
            raise InputError(f"{where}: router_logits has shape {tuple(stacked.shape)}, expected "
                             f"[{meta.num_moe_layers} MoE layers, tokens, {meta.num_experts} experts]")
        return list(stacked)
    names = [f"router_logits.{i}" for i in range(meta.num_moe_layers)]
    absent = [n for n in names if n not in keys]
    if absent:
        raise InputError(f"{where}: missing tensor {absent[0]!r} (expected router_logits.0.."
                         f"{meta.num_moe_layers - 1}, one per MoE layer)")
    return [f.get_tensor(n) for n in names]


def _sequences(f: Any, keys: set[str], n: int, where: str) -> tuple[np.ndarray, np.ndarray, np.ndarray | None,
                                                                      np.ndarray]:
    """(keep mask [N], sequence row [N], token ids [N] or None, position [N]) from input_ids /
    attention_mask."""
    if "input_ids" not in keys:
        return np.ones(n, dtype=bool), np.zeros(n, dtype=np.int64), None, np.arange(n)
    ids = f.get_tensor("input_ids")
    if ids.dtype.is_floating_point:
        raise InputError(f"{where}: input_ids must be integers, found {ids.dtype}")
    ids = ids.reshape(1, -1) if ids.dim() == 1 else ids
    if ids.dim() != 2 or ids.numel() != n:
        raise InputError(f"{where}: input_ids has shape {tuple(ids.shape)} for {n} router rows")
    b, s = ids.shape
    mask = np.ones((b, s), dtype=bool)
    if "attention_mask" in keys:
        m = f.get_tensor("attention_mask")
        if tuple(m.shape) != (b, s):
            raise InputError(f"{where}: attention_mask has shape {tuple(m.shape)}, input_ids {(b, s)}")
        mask = m.numpy().astype(bool)
    position = np.cumsum(mask, axis=1) - 1
    row = np.broadcast_to(np.arange(b)[:, None], (b, s))
    return mask.ravel(), row.ravel(), ids.numpy().astype(np.int64).ravel(), position.ravel()


def import_safetensors(paths: list[Path], sink: TraceSink, *, router_output: str,
                       keep_logits: bool) -> dict[str, Any]:
    import torch
    from safetensors import SafetensorError, safe_open

    from recorder.routers import topk_from_logits

    meta = sink.metadata
    over_top_k = check_semantics(meta)
    meta.router_first_output = router_output
    seq0 = 0
    for step, path in enumerate(paths):
        where = str(path)
        if not path.exists():
            raise InputError(f"{path}: no such file")
        try:
            with safe_open(str(path), framework="pt") as f:
                keys = set(f.keys())
                per_layer = [t.reshape(-1, t.shape[-1]) for t in _layer_logits(f, keys, meta, where)]
                n = int(per_layer[0].shape[0])
                for i, t in enumerate(per_layer):
                    if tuple(t.shape) != (n, meta.num_experts):
                        raise InputError(f"{where}: layer {i}'s router logits have shape {tuple(t.shape)}, "
                                         f"expected [{n} tokens, {meta.num_experts} experts]")
                    if not torch.isfinite(t).all():
                        raise InputError(f"{where}: layer {i}'s router logits hold a non-finite value")
                keep, row, token_ids, position = _sequences(f, keys, n, where)
        except SafetensorError as exc:
            raise InputError(f"{path}: not a readable safetensors file ({str(exc)[:160]})") from exc
        ids = np.empty((n, meta.num_moe_layers, meta.top_k), dtype=np.int64)
        weights = np.empty(ids.shape, dtype=np.float32)
        for i, logits in enumerate(per_layer):
            if router_output == "probabilities":
                w, top = torch.topk(logits.float(), meta.top_k, dim=-1)
                if meta.norm_topk_prob:
                    w = w / w.sum(-1, keepdim=True)
            else:
                w, top = topk_from_logits(logits, meta.top_k, norm_topk_prob=meta.norm_topk_prob,
                                          softmax_over_top_k=over_top_k)
            ids[:, i], weights[:, i] = top.numpy(), (w * meta.routed_scaling_factor).numpy()
        logits_out = np.stack([t.float().numpy() for t in per_layer], axis=1)[keep] if keep_logits else None
        sink.add(seq_id=seq0 + row[keep], position=position[keep],
                 phase=np.full(int(keep.sum()), PHASE_PREFILL), step=np.full(int(keep.sum()), step),
                 expert_ids=ids[keep], expert_weights=weights[keep],
                 token_id=None if token_ids is None else token_ids[keep], router_logits=logits_out,
                 where=where)
        seq0 += int(row.max()) + 1 if n else 0
    return {"files": len(paths)}
