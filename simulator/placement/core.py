"""The placement type: expert ids per physical slot, per layer, and the checks every placement passes.

Shape legend: L MoE layers, E experts per layer, G GPUs, S slots per GPU, N nodes, M = G*S physical slots.

A placement is `slots [L, G, S]`: the expert id held by each physical slot (-1: empty). An expert may be held
by several slots (replicas); a GPU never holds two replicas of one expert.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from simulator.hardware import ClusterLayout
from traces.errors import InputError


class PlacementNotApplicable(InputError):
    """A policy that cannot be built on this layout or load: str() is "policy: reason".

    A caller comparing several policies skips this one, showing `reason`, and keeps the others; every other
    InputError is bad input that stops the command.
    """

    def __init__(self, policy: str, reason: str):
        super().__init__(f"{policy}: {reason}")
        self.policy = policy
        self.reason = reason


@dataclass(frozen=True)
class Placement:
    """Expert ids per physical slot, per layer.

    slots: [L, G, S] int32, expert id held by each slot of each GPU (-1 = empty slot).
    """

    policy: str
    slots: np.ndarray
    num_experts: int
    gpus_per_node: int
    model_id: str | None = None  # set when a placement file names the model it was made for

    def __post_init__(self) -> None:
        if self.slots.ndim != 3:
            raise InputError(f"placement {self.policy}: slots must be [layers, gpus, slots], got shape "
                             f"{self.slots.shape}")
        object.__setattr__(self, "slots", np.ascontiguousarray(self.slots, dtype=np.int32))
        check_slots(self.slots, self.num_experts, self.policy)
        ClusterLayout(self.num_gpus, self.gpus_per_node)  # the one rule for GPUs in nodes; raises InputError

    @property
    def num_layers(self) -> int:
        return int(self.slots.shape[0])

    @property
    def num_gpus(self) -> int:
        return int(self.slots.shape[1])

    @property
    def slots_per_gpu(self) -> int:
        return int(self.slots.shape[2])

    @property
    def num_nodes(self) -> int:
        return max(1, self.num_gpus // self.gpus_per_node)

    @property
    def replica_counts(self) -> np.ndarray:
        """[L, E] number of slots holding each expert."""
        out = np.zeros((self.num_layers, self.num_experts), dtype=np.int64)
        for layer in range(self.num_layers):
            ids = self.slots[layer].ravel()
            np.add.at(out[layer], ids[ids >= 0], 1)
        return out

    @property
    def max_experts_per_gpu(self) -> int:
        """Most filled slots on any GPU in any layer (expert weight memory is sized by this)."""
        return int((self.slots >= 0).sum(axis=2).max())

    def to_dict(self) -> dict[str, Any]:
        return {
            "policy": self.policy,
            "model_id": self.model_id,
            "num_experts": self.num_experts,
            "gpus_per_node": self.gpus_per_node,
            "layers": self.slots.tolist(),
        }


def check_slots(slots: np.ndarray, num_experts: int, source: str) -> None:
    """Every expert held at least once per layer, ids in range, no expert twice on one GPU. slots: [L, G,
    S]."""
    if slots.size == 0:
        raise InputError(f"{source}: placement has no slots")
    if slots.min() < -1 or slots.max() >= num_experts:
        raise InputError(f"{source}: expert id out of range 0..{num_experts - 1}")
    layers = slots.shape[0]
    flat = slots.reshape(layers, -1)
    held = np.zeros((layers, num_experts + 1), dtype=np.int64)  # column num_experts collects empty slots
    rows = np.repeat(np.arange(layers), flat.shape[1])
    np.add.at(held, (rows, np.where(flat >= 0, flat, num_experts).ravel()), 1)
    missing_layer, missing_expert = np.nonzero(held[:, :num_experts] == 0)
    if missing_layer.size:
        layer = int(missing_layer[0])
        ids = missing_expert[missing_layer == layer][:8]
        raise InputError(f"{source}: layer {layer} misses expert(s) {', '.join(map(str, ids))}")
    ordered = np.sort(slots, axis=2)
    twice = (ordered[:, :, 1:] == ordered[:, :, :-1]) & (ordered[:, :, 1:] >= 0)
    if twice.any():
        layer, gpu, _ = np.argwhere(twice)[0]
        raise InputError(f"{source}: layer {layer} GPU {gpu} holds the same expert twice")



def expected_gpu_load(placement: Placement, load: np.ndarray) -> np.ndarray:
    """[L, G] load per GPU when each expert's load [L, E] is split evenly among its replicas."""
    counts = placement.replica_counts.astype(np.float64)
    per = np.divide(load, counts, out=np.zeros_like(load, dtype=np.float64), where=counts > 0)  # [L, E]
    slots = placement.slots  # [L, G, S]
    layer_idx = np.arange(placement.num_layers)[:, None, None]
    vals = np.where(slots >= 0, per[layer_idx, np.maximum(slots, 0)], 0.0)
    return vals.sum(axis=2)


def imbalance(gpu_load: np.ndarray) -> np.ndarray:
    """max / mean over the last axis (GPUs); 1.0 is perfect balance. Rows with zero load give 1.0."""
    mean = gpu_load.mean(axis=-1)
    peak = gpu_load.max(axis=-1)
    return np.divide(peak, mean, out=np.ones_like(mean, dtype=np.float64), where=mean > 0)
