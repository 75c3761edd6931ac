"""The simulator's Python API: replay a trace on a GPU layout, plan the cheapest layout for a throughput
target, replay periodic rebalancing, and load hardware; each result has a `render_*` text form and `to_dict()`
for JSON.

    from traces import open_trace
    import simulator

    with open_trace("trace.h5") as trace:
        config = simulator.ReplayConfig(num_gpus=8, hardware=simulator.load_hardware("h100"))
        result = simulator.replay_trace(trace, config)
    print(simulator.render_replay(result))

Names are imported on first use, so `import simulator` (or one of its light modules, such as simulator.units)
never pays for the Numba kernels until a replay runs.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

import traces as _traces  # noqa: F401  (sets Numba's cache directory before any kernel module imports Numba)

# public name -> (module, name there). The entry points are replay_trace / plan_trace / rebalance_trace: the
# subpackages simulator.replay and simulator.plan take the bare names.
_API = {
    "ReplayConfig": ("simulator.replay", "ReplayConfig"),
    "ReplayResult": ("simulator.replay", "ReplayResult"),
    "VariantSummary": ("simulator.replay", "VariantSummary"), "replay_trace": ("simulator.replay", "replay"),
    "render_replay": ("simulator.replay.render", "render_replay"),
    "PlanConfig": ("simulator.plan", "PlanConfig"), "PlanResult": ("simulator.plan", "PlanResult"),
    "Candidate": ("simulator.plan", "Candidate"), "plan_trace": ("simulator.plan", "plan"),
    "render_plan": ("simulator.plan.render", "render_plan"),
    "RebalanceConfig": ("simulator.rebalance", "RebalanceConfig"),
    "RebalanceResult": ("simulator.rebalance", "RebalanceResult"),
    "RebalanceAdvice": ("simulator.rebalance", "RebalanceAdvice"),
    "rebalance_trace": ("simulator.rebalance", "rebalance_trace"),
    "advise": ("simulator.rebalance", "advise"),
    "render_rebalance": ("simulator.rebalance.render", "render_rebalance"),
    "GpuSpec": ("simulator.hardware", "GpuSpec"), "load_hardware": ("simulator.hardware", "load_hardware"),
    "parse_hardware_list": ("simulator.hardware", "parse_hardware_list"),
}

__all__ = [
    "Candidate", "GpuSpec", "PlanConfig", "PlanResult", "RebalanceAdvice", "RebalanceConfig",
    "RebalanceResult", "ReplayConfig", "ReplayResult", "VariantSummary", "advise", "load_hardware",
    "parse_hardware_list",
    "plan_trace", "rebalance_trace", "render_plan", "render_rebalance", "render_replay", "replay_trace",
]

if TYPE_CHECKING:
    from simulator.hardware import GpuSpec, load_hardware, parse_hardware_list
    from simulator.plan import Candidate, PlanConfig, PlanResult
    from simulator.plan import plan as plan_trace
    from simulator.plan.render import render_plan
    from simulator.rebalance import RebalanceAdvice, RebalanceConfig, RebalanceResult, advise, rebalance_trace
    from simulator.rebalance.render import render_rebalance
    from simulator.replay import ReplayConfig, ReplayResult, VariantSummary
    from simulator.replay import replay as replay_trace
    from simulator.replay.render import render_replay


def __getattr__(name: str) -> Any:
    if name not in _API:
        raise AttributeError(f"module 'simulator' has no attribute {name!r}")
    module, attr = _API[name]
    return getattr(importlib.import_module(module), attr)
