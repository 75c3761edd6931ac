"""`moe-sim place --explain`: every policy fitted on the same load and GPUs, each against the per-layer lower
bound of its layout (simulator.placement.bound), so the output shows how far each can be from the best.

Shape legend: L MoE layers, E experts, G GPUs.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

from simulator.placement import (
    NEEDS_COSELECTION,
    POLICIES,
    USES_REDUNDANCY,
    PlacementNotApplicable,
    RoutingSample,
    expected_gpu_load,
    fit_placement,
    imbalance,
)
from simulator.placement.bound import LayoutBound, placement_bound

LEGEND = ("imbalance: expected GPU load max/mean per layer on the fitted load (mean over layers, and the "
          "worst layer); bound: no placement of that layout (R redundant, slots per GPU) can be below it, "
          "per layer (docs/simulator.md, \"Optimality gap\"); gap: imbalance / bound - 1 per layer (0: "
          "provably optimal)")


@dataclass(frozen=True)
class PolicyGap:
    """One policy's balance against the bound of its layout; `skipped`: why a policy could not be fitted."""

    policy: str
    redundant_experts: int
    slots_per_gpu: int | None
    imbalance_mean: float | None
    imbalance_worst: float | None
    bound_mean: float | None
    gap_mean: float | None
    gap_worst: float | None
    skipped: str | None = None

    def to_dict(self) -> dict[str, object]:
        return asdict(self)


def explain_policies(load: np.ndarray, coselection: np.ndarray | None, routing: RoutingSample | None, *,
                     num_gpus: int, gpus_per_node: int, redundant_experts: int) -> list[PolicyGap]:
    """Fit every policy on load [L, E] (coselection [L, E, E] and the routing sample, or None) and score it
    against the bound."""
    load = np.asarray(load, dtype=np.float64)
    bounds: dict[tuple[int, bytes], LayoutBound] = {}  # one per layout (slots per GPU, filled per layer)
    rows = []
    for policy in POLICIES:
        redundant = redundant_experts if policy in USES_REDUNDANCY else 0
        if policy in NEEDS_COSELECTION and coselection is None:
            rows.append(PolicyGap(policy, redundant, None, None, None, None, None, None,
                                  "needs co-selection, which only a trace has"))
            continue
        try:
            placement = fit_placement(policy, load, num_gpus=num_gpus, gpus_per_node=gpus_per_node,
                                      redundant_experts=redundant, coselection=coselection, routing=routing)
        except PlacementNotApplicable as exc:
            rows.append(PolicyGap(policy, redundant, None, None, None, None, None, None, exc.reason))
            continue
        filled = (placement.slots >= 0).reshape(placement.num_layers, -1).sum(axis=1)
        key = (placement.slots_per_gpu, filled.tobytes())
        if key not in bounds:
            bounds[key] = placement_bound(placement, load)
        bound = bounds[key].imbalance
        ratio = imbalance(expected_gpu_load(placement, load))
        gap = ratio / bound - 1.0
        rows.append(PolicyGap(policy, redundant, placement.slots_per_gpu, float(ratio.mean()),
                              float(ratio.max()), float(bound.mean()), float(gap.mean()), float(gap.max())))
    return rows


def render_explain(rows: list[PolicyGap]) -> list[str]:
    """The table `moe-sim place --explain` prints, with its legend line."""
    lines = ["policy            R  slots  imbalance  worst     bound     gap      worst gap"]
    for r in rows:
        if r.skipped is not None:
            lines.append(f"{r.policy:<16} {r.redundant_experts:>2}  skipped: {r.skipped}")
            continue
        assert r.gap_mean is not None and r.gap_worst is not None  # set whenever the policy was fitted
        lines.append(f"{r.policy:<16} {r.redundant_experts:>2}  {r.slots_per_gpu:>5}  "
                     f"{r.imbalance_mean:9.4f}  {r.imbalance_worst:8.4f}  {r.bound_mean:8.4f}  "
                     f"{100 * r.gap_mean:6.2f}%  "
                     f"{100 * r.gap_worst:8.2f}%")
    lines.append(LEGEND)
    return lines
