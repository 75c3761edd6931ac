"""Fit a placement by name, or read one from a placement file (the only I/O of the placement package)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from simulator.placement.core import Placement, PlacementNotApplicable
from simulator.placement.policies import POLICIES, TRAFFIC_AWARE, USES_REDUNDANCY
from simulator.placement.routing import RoutingSample
from traces.errors import InputError, read_json


def fit_placement(policy: str, load: np.ndarray, *, num_gpus: int, gpus_per_node: int,
                  redundant_experts: int = 0, coselection: np.ndarray | None = None,
                  routing: RoutingSample | None = None, step_budget: float | None = None) -> Placement:
    """Fit a named policy (or `file:PATH`) to a load [L, E]; coselection [L, E, E] for coactivation and
    affinity, which also use `routing` (a trace's sampled steps) and `step_budget` when given."""
    load = np.asarray(load, dtype=np.float64)
    if policy.startswith("file:"):
        placement = load_placement_file(policy[5:], num_experts=load.shape[1], num_layers=load.shape[0])
        if placement.num_gpus != num_gpus:
            raise PlacementNotApplicable(policy,
                                         f"placement is for {placement.num_gpus} GPUs, not --gpus {num_gpus}")
        return Placement(policy, placement.slots, placement.num_experts, gpus_per_node, placement.model_id)
    if policy not in POLICIES:
        raise InputError(f"--placements: unknown policy {policy!r}; choose from {', '.join(POLICIES)} or "
                         "file:PATH")
    if redundant_experts and policy not in USES_REDUNDANCY:
        redundant_experts = 0
    extra: dict[str, object] = {}
    if policy in TRAFFIC_AWARE:
        extra["routing"] = routing
        if step_budget is not None:
            extra["step_budget"] = step_budget
    slots = POLICIES[policy](load, num_gpus=num_gpus, gpus_per_node=gpus_per_node,
                             redundant_experts=redundant_experts, coselection=coselection, **extra)
    return Placement(policy, slots, int(load.shape[1]), gpus_per_node)


def load_placement_file(path: str | Path, *, num_experts: int, num_layers: int) -> Placement:
    """Read a placement JSON: {"num_experts": E, "gpus_per_node": n, "model_id": str, "layers":
    [[[ids]...]...]}.

    Only "layers" is required; "model_id", when present, must match the trace's (checked by the replay).

    "layers" is [L][G][S] (pad short GPUs with -1), or a single [G][S] used for every layer.
    """
    p = Path(path)
    data = read_json(p, "a JSON placement file")
    if not isinstance(data, dict) or "layers" not in data:
        raise InputError(f"{p}: placement file needs a \"layers\" list ([layers][gpus][slots] expert ids)")
    file_experts = data.get("num_experts", num_experts)
    if file_experts != num_experts:
        raise InputError(f"{p}: placement is for {file_experts} experts but the trace has {num_experts}")
    try:
        arr = np.array(data["layers"], dtype=np.int64)
    except (ValueError, TypeError) as exc:
        raise InputError(f"{p}: \"layers\" must be a rectangular list of integers (pad with -1)") from exc
    if arr.ndim == 2:
        arr = np.broadcast_to(arr, (num_layers, *arr.shape)).copy()
    if arr.ndim != 3:
        raise InputError(f"{p}: \"layers\" must be [layers][gpus][slots], got {arr.ndim} dimensions")
    if arr.shape[0] != num_layers:
        raise InputError(f"{p}: placement has {arr.shape[0]} layers but the trace has {num_layers}")
    gpn_raw = data.get("gpus_per_node", arr.shape[1])
    if not isinstance(gpn_raw, int) or gpn_raw < 1:
        raise InputError(f"{p}: \"gpus_per_node\" must be a positive integer")
    gpn = gpn_raw
    model_id = data.get("model_id")
    return Placement(f"file:{p}", arr.astype(np.int32), num_experts, gpn,
                     str(model_id) if model_id is not None else None)
