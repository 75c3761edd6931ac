"""What a replay runs: the config (on the shared scoring options) and one variant, a fitted placement with its
step size."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass, field

from simulator.hardware import GpuSpec
from simulator.options import DEFAULT_FIT_FRACTION, PHASES, ScoringOptions
from simulator.placement import Placement, default_redundant_experts
from traces.errors import InputError

__all__ = ["DEFAULT_FIT_FRACTION", "DEFAULT_PLACEMENTS", "PHASES", "Progress", "ReplayConfig", "Variant"]

DEFAULT_PLACEMENTS = ("contiguous", "round-robin", "balanced", "replicated", "coactivation")

Progress = Callable[[int], None]  # called with the number of tokens just streamed


@dataclass(kw_only=True)
class ReplayConfig(ScoringOptions):
    """What to replay and on what. `moe-sim replay` fills it from its options."""

    num_gpus: int = 8
    hardware: GpuSpec = field(default_factory=lambda: GpuSpec.from_name("h100"))
    placements: tuple[str, ...] = DEFAULT_PLACEMENTS  # policy names or file:PATH
    # R extra slots for replicated / coactivation; None: the library's default for the trace's experts
    # (placement.default_redundant_experts: one per GPU, rounded so the slots divide), resolved by replay
    redundant_experts: int | None = None
    tokens_per_step: int = 0  # 0: the recorded forward passes are the steps

    def __post_init__(self) -> None:
        super().__post_init__()
        self.check_layout(self.num_gpus)
        if self.tokens_per_step < 0:
            raise InputError(f"--tokens-per-step must not be negative, got {self.tokens_per_step}")
        if self.redundant_experts is not None and self.redundant_experts < 0:
            raise InputError(f"--redundant-experts must not be negative, got {self.redundant_experts}")
        if not self.placements:
            raise InputError("--placements: give at least one policy")

    def resolved(self, num_experts: int) -> tuple[ReplayConfig, str | None]:
        """This config with redundant_experts resolved for a trace of num_experts experts, and the note that
        says when the default was rounded (None otherwise)."""
        if self.redundant_experts is not None:
            return self, None
        r = default_redundant_experts(num_experts, self.num_gpus)
        return dataclasses.replace(self, redundant_experts=r.redundant_experts), r.note

    @property
    def redundancy(self) -> int:
        """redundant_experts, once resolved (see resolved)."""
        if self.redundant_experts is None:
            raise ValueError("ReplayConfig.redundant_experts is not resolved yet: call resolved(num_experts)")
        return self.redundant_experts


@dataclass(frozen=True)
class Variant:
    """One column of the replay: a fitted placement and how tokens form steps."""

    label: str
    placement: Placement
    tokens_per_step: int
    redundant_experts: int
    # -1: every scored token; PHASE_PREFILL / PHASE_DECODE: only that phase's (plan splits them)
    phase: int = -1
