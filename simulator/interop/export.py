"""A placement in the forms serving engines load, and back (docs/import.md cites each engine's reader).

Shape legend: L MoE layers, G GPUs (expert-parallel ranks), S slots per GPU, E logical experts, M = G*S
physical slots, X most replicas of one expert. Every engine numbers physical slots rank-major: slot m lives on
GPU m // S.

- sglang: `--init-expert-location FILE.json` with {"physical_to_logical_map": [num layers][M]}; SGLang counts
  every decoder layer of DeepSeek-style models, so dense layers get the trivial map (slot m holds m mod E).
- trtllm: the MoE load balancer YAML, {"num_slots": M, "initial_global_assignments": {decoder layer: [M ids]},
  "layer_updates_per_iter": 0} (0: keep this placement, no online updates).
- eplb: DeepSeek EPLB's output arrays, phy2log [L, M], log2phy [L, E, X] (padded with -1), logcnt [L, E].
- vllm: vLLM builds its expert map at start-up (`--expert-placement-strategy linear|round_robin`, EPLB's own
  rebalancing with `--enable-eplb`); it loads no per-expert map. The export names the strategy that reproduces
  the placement when one does, the EPLB settings otherwise, and keeps the map for reference.
Every engine needs every slot filled: a placement with empty slots (-1) cannot be exported.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from traces.errors import InputError
from traces.writer import write_text_atomic

TARGETS = ("sglang", "trtllm", "eplb", "vllm")
VLLM_CANNOT = ("vLLM loads no expert map: it places experts by --expert-placement-strategy (linear or "
               "round_robin) and, with --enable-eplb, moves them itself at run time")


def physical_map(slots: np.ndarray, target: str) -> np.ndarray:
    """phy2log [L, M]: the logical expert of each physical slot, rank-major. slots: [L, G, S]."""
    if (slots < 0).any():
        layer, gpu, _ = np.argwhere(slots < 0)[0]
        raise InputError(f"--export {target}: GPU {gpu} has an empty slot in layer {layer}; engines fill "
                         "every slot (use a policy that fills them, or --redundant-experts to make the slots "
                         "even)")
    return slots.reshape(slots.shape[0], -1).astype(np.int64)


def logical_to_physical(phy2log: np.ndarray, num_experts: int) -> tuple[np.ndarray, np.ndarray]:
    """(log2phy [L, E, X] padded with -1, logcnt [L, E]) from phy2log [L, M]."""
    layers, _ = phy2log.shape
    logcnt = np.zeros((layers, num_experts), dtype=np.int64)
    for layer in range(layers):
        np.add.at(logcnt[layer], phy2log[layer], 1)
    log2phy = np.full((layers, num_experts, int(logcnt.max())), -1, dtype=np.int64)
    for layer in range(layers):
        fill = np.zeros(num_experts, dtype=np.int64)
        for m, e in enumerate(phy2log[layer]):
            log2phy[layer, e, fill[e]] = m
            fill[e] += 1
    return log2phy, logcnt


def vllm_strategy(slots: np.ndarray) -> str | None:
    """'linear' or 'round_robin' when the placement is that vLLM layout in every layer, else None."""
    layers, gpus, per = slots.shape
    experts = gpus * per
    if (slots < 0).any() or len(np.unique(slots[0])) != experts:
        return None
    linear = np.arange(experts).reshape(gpus, per)
    round_robin = np.arange(experts).reshape(per, gpus).T
    for name, layout in (("linear", linear), ("round_robin", round_robin)):
        if all(np.array_equal(slots[i], layout) for i in range(layers)):
            return name
    return None


def export_document(slots: np.ndarray, target: str, *, num_experts: int, moe_layers: list[int],
                    num_hidden_layers: int, model_id: str | None, redundant_experts: int) -> dict[str, Any]:
    """The engine's document for a placement (JSON-able)."""
    if target not in TARGETS:
        raise InputError(f"--export: choose one of {', '.join(TARGETS)}, not {target!r}")
    gpus, per = int(slots.shape[1]), int(slots.shape[2])
    phy2log = physical_map(slots, target)
    made = {"model_id": model_id, "ep_size": gpus, "moe_layers": moe_layers}
    if target == "sglang":
        full = np.tile(np.arange(gpus * per) % num_experts, (num_hidden_layers, 1))
        full[moe_layers] = phy2log
        return {"physical_to_logical_map": full.tolist(), "moe_trace": made}
    if target == "trtllm":
        return {"num_slots": gpus * per, "layer_updates_per_iter": 0,
                "initial_global_assignments": {int(layer): phy2log[i].tolist()
                                               for i, layer in enumerate(moe_layers)}}
    if target == "eplb":
        log2phy, logcnt = logical_to_physical(phy2log, num_experts)
        return {"phy2log": phy2log.tolist(), "log2phy": log2phy.tolist(), "logcnt": logcnt.tolist(),
                "moe_trace": made}
    strategy = vllm_strategy(slots)
    doc: dict[str, Any] = {"cannot_load": VLLM_CANNOT, "physical_to_logical_map": phy2log.tolist(),
                           "moe_trace": made}
    if strategy is not None:
        doc["engine_args"] = {"enable_expert_parallel": True, "expert_placement_strategy": strategy}
        doc["reproduces_placement"] = True
    else:
        doc["engine_args"] = {"enable_expert_parallel": True, "enable_eplb": True,
                              "eplb_config": {"num_redundant_experts": redundant_experts}}
        doc["reproduces_placement"] = False
    return doc


def write_export(path: str | Path, doc: dict[str, Any], target: str, *, force: bool = False) -> Path:
    """Write atomically: TensorRT-LLM's as YAML, the others as JSON."""
    if target == "trtllm":
        import yaml

        text = yaml.safe_dump(doc, default_flow_style=None, sort_keys=False, width=1 << 20)
    else:
        text = json.dumps(doc) + "\n"
    return write_text_atomic(path, text, force=force)


def read_export(path: str | Path, target: str, *, num_gpus: int, moe_layers: list[int]) -> np.ndarray:
    """slots [L, G, S] from an exported document (the round trip of export_document)."""
    p = Path(path)
    try:
        if target == "trtllm":
            import yaml

            doc = yaml.safe_load(p.read_text())
        else:
            doc = json.loads(p.read_text())
    except (OSError, ValueError) as exc:
        raise InputError(f"{p}: cannot read the {target} export ({str(exc)[:120]})") from exc
    if not isinstance(doc, dict):
        raise InputError(f"{p}: not a {target} placement document")
    try:
        if target == "sglang":
            phy2log = np.asarray(doc["physical_to_logical_map"], dtype=np.int64)[moe_layers]
        elif target == "trtllm":
            assignments = doc["initial_global_assignments"]
            phy2log = np.asarray([assignments[layer] for layer in moe_layers], dtype=np.int64)
        elif target == "eplb":
            phy2log = np.asarray(doc["phy2log"], dtype=np.int64)
        else:
            phy2log = np.asarray(doc["physical_to_logical_map"], dtype=np.int64)
    except (KeyError, IndexError, TypeError, ValueError) as exc:
        raise InputError(f"{p}: the {target} export lacks its placement "
                         f"({type(exc).__name__}: {exc})") from exc
    if phy2log.ndim != 2 or phy2log.shape[1] % num_gpus:
        raise InputError(f"{p}: {phy2log.shape} physical slots do not divide over {num_gpus} GPUs")
    return phy2log.reshape(phy2log.shape[0], num_gpus, -1)
