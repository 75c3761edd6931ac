"""A rebalance replay on a trace: the config (with its defaults for the window and the intervals), and the
run."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from simulator.cost_model import expert_weight_bytes
from simulator.hardware import ClusterLayout, GpuSpec
from simulator.rebalance.result import DEFAULT_MARGIN, RebalanceResult, RefitPrices
from simulator.rebalance.schedule import FitFn, RebalanceReplay, replay_rebalance
from simulator.rebalance.steps import count_steps, iter_step_loads
from traces.errors import InputError
from traces.reader import DEFAULT_CHUNK_TOKENS, Trace

if TYPE_CHECKING:
    from simulator.cluster import Cluster

MAX_REFITS = 100  # default_intervals() keeps each schedule to this many refits
WINDOW_CAP = 1000  # vLLM's EPLB default window, in steps


@dataclass(frozen=True)
class RebalanceConfig:
    """What `moe-sim rebalance` and the report's rebalance section replay.

    Left empty, `every` and `window` come from the trace's step count (default_intervals, default_window) when
    the config is resolved against it (`resolve`, which rebalance_trace does).
    """

    # W values: steps between refits; (): a spread from 1 step to the trace's length
    every: tuple[int, ...] = ()
    window: int | None = None  # N: steps of load each refit looks at; None: default_window
    policy: str = "balanced"  # placement policy refitted each time (a load-only policy)
    num_gpus: int = 8
    gpus_per_node: int = 8
    redundant_experts: int = 0
    phase: str | None = None  # "prefill", "decode" or None for both
    # regroup tokens into steps of this size; None: recorded forward passes
    tokens_per_step: int | None = None
    # prices expert time and weight moves
    hardware: GpuSpec = field(default_factory=lambda: GpuSpec.from_name("h100"))
    margin: float = DEFAULT_MARGIN  # refit only when it beats the fixed placement by this fraction

    def __post_init__(self) -> None:
        ClusterLayout(self.num_gpus, self.gpus_per_node)  # raises InputError on an impossible layout
        for w in self.every:
            if w < 1:
                raise InputError(f"--rebalance-every must be at least 1 step, not {w}")
        if self.window is not None and self.window < 1:
            raise InputError(f"--window must be at least 1 step, not {self.window}")
        if not 0.0 <= self.margin < 1.0:
            raise InputError(f"--margin must be in [0, 1), got {self.margin}")
        if self.tokens_per_step is not None and self.tokens_per_step < 1:
            raise InputError(f"--tokens-per-step must be at least 1, not {self.tokens_per_step}")
        if self.policy.startswith("file:"):
            raise InputError("--placement: a fixed placement file cannot be refitted; choose a policy")

    def fit_function(self, num_experts: int) -> FitFn:
        """load [L, E] -> slots [L, G, S] with the configured policy.

        The first fit goes through placement.fit_placement, which validates the layout and the slots; refits
        call the policy's pure function from the POLICIES registry directly, skipping the per-fit validation
        of the Placement object (a Python loop per layer and GPU that would otherwise dominate a replay with
        thousands of refits). That is safe because every policy gives legal slots on any load, sparse or
        all-zero windows included (property test in tests/test_sim_placement.py).
        """
        from simulator.placement import NEEDS_COSELECTION, POLICIES, USES_REDUNDANCY, fit_placement

        if self.policy in NEEDS_COSELECTION:
            raise InputError(f"--placement {self.policy}: rebalancing refits from load alone; choose a load "
                             "policy")
        try:
            fit_placement(self.policy, np.ones((1, num_experts)), num_gpus=self.num_gpus,
                          gpus_per_node=self.gpus_per_node, redundant_experts=self.redundant_experts)
        except InputError as exc:
            raise InputError(f"rebalance placement {self.policy!r} on {self.num_gpus} GPUs: {exc}") from exc
        policy = POLICIES[self.policy]
        redundant = self.redundant_experts if self.policy in USES_REDUNDANCY else 0

        def fit(load: np.ndarray) -> np.ndarray:
            return policy(np.asarray(load, dtype=np.float64), num_gpus=self.num_gpus,
                          gpus_per_node=self.gpus_per_node, redundant_experts=redundant)

        return fit

    def settings(self) -> dict[str, Any]:
        return {
            "policy": self.policy,
            "num_gpus": self.num_gpus,
            "gpus_per_node": self.gpus_per_node,
            "redundant_experts": self.redundant_experts,
            "phase": self.phase or "all",
            "tokens_per_step": self.tokens_per_step,
            "hardware": self.hardware.name,
            "margin": self.margin,
        }

    def resolve(self, trace: Trace, chunk_tokens: int = DEFAULT_CHUNK_TOKENS) -> RebalanceConfig:
        """This config with the window and intervals filled in from the trace's step count (a cheap pass over
        the step and phase columns, skipped when both are given)."""
        if self.every and self.window is not None:
            return self
        steps = count_steps(trace, phase=self.phase, tokens_per_step=self.tokens_per_step,
                            chunk_tokens=chunk_tokens)
        window = self.window if self.window is not None else default_window(steps)
        return dataclasses.replace(self, window=window, every=self.every or default_intervals(steps, window))


def rebalance_trace(
    trace: Trace,
    config: RebalanceConfig,
    *,
    chunk_tokens: int = DEFAULT_CHUNK_TOKENS,
    progress: Callable[[int], None] | None = None,
    cluster: Cluster | None = None,
) -> list[RebalanceResult]:
    """Replay every interval in config.every over the trace: one streamed pass, two when an interval is too
    long to hold its steps in memory (progress then counts both). Defaults are filled in first
    (RebalanceConfig.resolve). With a cluster, each interval is one task: a worker streams the trace itself
    and replays that interval alone, which gives the same result (the intervals share nothing but the
    steps)."""
    meta = trace.metadata
    config = config.resolve(trace, chunk_tokens)
    assert config.window is not None
    fit = config.fit_function(meta.num_experts)
    if cluster is not None:
        total = trace.num_tokens * passes_needed(config.every, meta.num_moe_layers, meta.num_experts)
        items = [(dataclasses.replace(config, every=(w,)), chunk_tokens) for w in config.every]
        results = []
        for i, result in enumerate(cluster.map(rebalance_interval, trace, items)):
            results.append(result)
            if progress is not None:
                progress(total * (i + 1) // len(items) - total * i // len(items))
        return results

    def loads() -> Iterator[np.ndarray]:
        return iter_step_loads(trace, phase=config.phase, tokens_per_step=config.tokens_per_step,
                               chunk_tokens=chunk_tokens, progress=progress)

    # weights move at the serving precision the cost model assumes (BF16), as the replay prices weight reads
    return replay_rebalance(loads, fit, every=config.every, window=config.window,
                            num_experts=meta.num_experts, expert_bytes=int(expert_weight_bytes(meta)),
                            gpus_per_node=config.gpus_per_node,
                            settings=config.settings(), prices=RefitPrices.for_gpu(config.hardware, meta),
                            dense_layers=meta.num_hidden_layers - meta.num_moe_layers)


def rebalance_interval(trace: Trace, _shared: None, config: RebalanceConfig,
                       chunk_tokens: int) -> RebalanceResult:
    """A cluster task: the one interval of a resolved config replayed over the trace."""
    return rebalance_trace(trace, config, chunk_tokens=chunk_tokens)[0]


def passes_needed(every: Sequence[int], num_layers: int, num_experts: int) -> int:
    """Streamed passes rebalance_trace makes: 2 when some interval is too long to hold (for progress bars)."""
    step_bytes = num_layers * num_experts * np.dtype(np.int32).itemsize
    return 2 if max(every) > max(1, RebalanceReplay.BUFFER_BYTES // step_bytes) else 1


def default_window(steps: int) -> int:
    """Window N when none is given: an eighth of the trace's steps, at most WINDOW_CAP (vLLM's EPLB
    window)."""
    return max(1, min(WINDOW_CAP, steps // 8))


def default_intervals(steps: int, window: int) -> tuple[int, ...]:
    """Refit intervals worth comparing on a trace of `steps` steps: powers of ~3 from 1 up to the scored
    length."""
    scored = max(1, steps - window)
    candidates = [1, 3, 10, 30, 100, 300, 1000, 3000, 10000, 30000, 100000]
    # at most MAX_REFITS refits per interval keeps the sweep quick; an interval as long as the trace means
    # "never"
    picked = tuple(w for w in candidates if w <= scored and scored / w <= MAX_REFITS)
    return picked or (scored,)
