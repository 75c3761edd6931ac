"""What a plan sweeps and aims for (on the shared scoring options), and GPU-hour prices."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from simulator.cost_model import DEFAULT_CONTEXT_TOKENS, DEFAULT_TOKENS_PER_GPU
from simulator.hardware import GpuSpec
from simulator.options import ScoringOptions
from traces.errors import InputError

LATENCY_PERCENTILE = "p95"  # --max-step-ms bounds this percentile of the whole-model step time
# A regrouped grid point is planned only when the scored part holds at least this many full steps of each
# phase it replays: fewer would make the mean and p95 rest on one or two steps (and a partial last step).
MIN_FULL_STEPS = 4


@dataclass(kw_only=True)
class PlanConfig(ScoringOptions):
    """The grid to sweep and the goal. `moe-sim plan` fills it from its options.

    Batch axis: `tokens_per_gpu` (step = b x GPUs tokens) or `tokens_per_step` (absolute; 0 = the recorded
    forward passes), not both; with neither, the per-GPU default for the phase
    (cost_model.DEFAULT_TOKENS_PER_GPU).
    """

    target_tokens_per_s: float
    hardware: list[GpuSpec] = field(default_factory=lambda: [GpuSpec.from_name("h100")])
    gpus: list[int] = field(default_factory=lambda: [8, 16, 32, 64])
    placements: list[str] = field(default_factory=lambda: ["contiguous", "balanced", "replicated"])
    redundant_experts: list[int] = field(default_factory=lambda: [0, 8, 16])
    tokens_per_step: list[int] | None = None  # absolute step sizes; 0: the recorded forward passes
    max_step_ms: float | None = None
    context_tokens: int = DEFAULT_CONTEXT_TOKENS
    tokens_per_gpu: list[int] | None = None  # per-GPU batch: a step of G GPUs holds b x G tokens
    min_full_steps: int = MIN_FULL_STEPS

    def __post_init__(self) -> None:
        super().__post_init__()
        if not self.target_tokens_per_s > 0:
            raise InputError(f"--target-tokens-per-s must be positive, got {self.target_tokens_per_s}")
        if self.tokens_per_step is not None and self.tokens_per_gpu is not None:
            raise InputError("--tokens-per-step and --tokens-per-gpu are mutually exclusive: give absolute "
                             "step sizes or per-GPU batches, not both")
        if self.tokens_per_step is None and self.tokens_per_gpu is None:
            self.tokens_per_gpu = list(DEFAULT_TOKENS_PER_GPU[self.phase])
        if not self.hardware or not self.gpus or not self.placements or not self.redundant_experts \
                or not self.batches:
            raise InputError("plan: every grid axis needs at least one value")
        for g in self.gpus:
            self.check_layout(g)
        if any(r < 0 for r in self.redundant_experts):
            raise InputError("--redundant-experts values must not be negative")
        if self.tokens_per_step is not None and any(b < 0 for b in self.tokens_per_step):
            raise InputError("--tokens-per-step values must not be negative (0 = recorded steps)")
        if self.tokens_per_gpu is not None and any(b < 1 for b in self.tokens_per_gpu):
            raise InputError("--tokens-per-gpu values must be positive")
        if self.max_step_ms is not None and self.max_step_ms <= 0:
            raise InputError(f"--max-step-ms must be positive, got {self.max_step_ms}")
        names = [g.name for g in self.hardware]
        if len(set(names)) != len(names):
            raise InputError(f"--hardware: GPU names must be distinct, got {', '.join(names)}")

    @property
    def per_gpu(self) -> bool:
        return self.tokens_per_gpu is not None

    @property
    def batches(self) -> list[int]:
        """The batch axis as given: per-GPU batches, or absolute tokens per step."""
        values = self.tokens_per_gpu if self.tokens_per_gpu is not None else self.tokens_per_step
        return sorted(set(values or []))

    def step_tokens(self, batch: int, num_gpus: int) -> int:
        """Tokens per step of a grid point (0: recorded steps)."""
        return batch * num_gpus if self.per_gpu else batch

    @property
    def priced(self) -> bool:
        """Every GPU type swept has a price, so layouts can be ranked by cost."""
        return all(g.price_per_gpu_hour is not None for g in self.hardware)


def parse_gpu_hour_cost(text: str) -> dict[str, float]:
    """`--gpu-hour-cost h100=2.5,b200=6` -> {"h100": 2.5, "b200": 6.0} (prices per GPU-hour, the user's
    currency)."""
    prices: dict[str, float] = {}
    for item in (t.strip() for t in text.split(",")):
        if not item:
            continue
        name, sep, value = item.partition("=")
        try:
            price = float(value)
        except ValueError:
            price = float("nan")
        if not sep or not name.strip() or not price > 0:
            raise InputError(f"--gpu-hour-cost: expected NAME=PRICE with a positive price, got {item!r}")
        prices[name.strip().lower()] = price
    if not prices:
        raise InputError("--gpu-hour-cost: give at least one NAME=PRICE")
    return prices


def apply_prices(hardware: list[GpuSpec], prices: dict[str, float]) -> list[GpuSpec]:
    """Set price_per_gpu_hour on the swept GPUs named in prices (a price given here overrides a hardware
    file's)."""
    names = {g.name.lower() for g in hardware}
    unknown = sorted(set(prices) - names)
    if unknown:
        raise InputError(f"--gpu-hour-cost: {', '.join(unknown)} not in --hardware "
                         f"({', '.join(sorted(names))})")
    return [dataclasses.replace(g, price_per_gpu_hour=prices[g.name.lower()]) if g.name.lower() in prices
            else g
            for g in hardware]


