"""The options replay, plan and the report share: the cluster's node size and how a trace is scored.

One base (`ScoringOptions`) holds them with their checks, so `ReplayConfig`, `PlanConfig` and the report's
`ReportOptions` validate them alike; each adds what is its own (GPU count or counts, placements, the goal).
"""

from __future__ import annotations

from dataclasses import dataclass

from simulator.cost_model import DEFAULT_HBM_RESERVE
from simulator.hardware import ClusterLayout
from traces.errors import InputError
from traces.reader import DEFAULT_CHUNK_TOKENS
from traces.schema import PHASE_DECODE, PHASE_PREFILL

# --phase name -> phase code (-1: both)
PHASES = {"all": -1, "prefill": PHASE_PREFILL, "decode": PHASE_DECODE}
# --dispatch: how a step's tokens of an expert split over its replicas (docs/simulator.md; codes are the
# positions, dispatch_kernels.P_*)
DISPATCH_POLICIES = ("static", "round-robin", "least-loaded", "lp")
# Fit on the first quarter of the (phase-selected) tokens, score on the other three quarters: placements are
# never scored on the tokens they were fitted to, and the scored part stays the larger one.
DEFAULT_FIT_FRACTION = 0.25


@dataclass(kw_only=True)
class ScoringOptions:
    """Cluster and scoring options common to replay, plan and the report. Constructors never touch the
    disk."""

    gpus_per_node: int = 8  # GPUs per node (NVLink domain)
    phase: str = "all"  # all, prefill or decode
    fit_fraction: float = DEFAULT_FIT_FRACTION  # 0: fit and score on the whole trace (optimistic)
    capacity_factor: float | None = None  # None: no tokens dropped
    hbm_reserve: float = DEFAULT_HBM_RESERVE  # HBM share kept for KV cache and activations
    chunk_tokens: int = DEFAULT_CHUNK_TOKENS
    dispatch: str = "static"  # how a step's tokens split over an expert's replicas (DISPATCH_POLICIES)

    def __post_init__(self) -> None:
        if self.phase not in PHASES:
            raise InputError(f"--phase must be one of {', '.join(PHASES)}, not {self.phase!r}")
        if self.dispatch not in DISPATCH_POLICIES:
            raise InputError(f"--dispatch must be one of {', '.join(DISPATCH_POLICIES)}, "
                             f"not {self.dispatch!r}")
        if not 0.0 <= self.fit_fraction < 1.0:
            raise InputError(f"--fit-fraction must be in [0, 1), got {self.fit_fraction}")
        if self.capacity_factor is not None and self.capacity_factor <= 0:
            raise InputError(f"--capacity-factor must be positive, got {self.capacity_factor}")
        if not 0.0 <= self.hbm_reserve < 1.0:
            raise InputError(f"--hbm-reserve must be in [0, 1), got {self.hbm_reserve}")
        if self.chunk_tokens < 1:
            raise InputError("chunk_tokens must be positive")

    def check_layout(self, num_gpus: int) -> None:
        """num_gpus must split into whole nodes of gpus_per_node (InputError otherwise)."""
        ClusterLayout(num_gpus, self.gpus_per_node)
