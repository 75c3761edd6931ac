"""Expert placements: which physical slot on which GPU holds which expert, per layer.

- `core`: the `Placement` type, its checks, and the expected load per GPU;
- `packing`: the Numba packing kernels (plain arrays, no I/O);
- `policies`: the pure policies, from a load [L, E] to slots [L, G, S];
- `files`: `fit_placement` by name or `file:PATH`, and the reading of placement files;
- `routing`, `traffic`, `traffic_search`: what the traffic-aware policies fit on (sampled steps, cross-layer
  co-selection) and their token-level search;
- `bound`: the per-layer lower bound on any static placement's imbalance (the optimality gap).
"""

from simulator.placement.core import (
    Placement,
    PlacementNotApplicable,
    check_slots,
    expected_gpu_load,
    imbalance,
)
from simulator.placement.files import fit_placement, load_placement_file
from simulator.placement.packing import pack_items, replica_counts_minmax
from simulator.placement.policies import (
    NEEDS_COSELECTION,
    POLICIES,
    TRAFFIC_AWARE,
    USES_REDUNDANCY,
    Redundancy,
    default_redundant_experts,
)
from simulator.placement.routing import RoutingSample

__all__ = [
    "NEEDS_COSELECTION",
    "POLICIES",
    "TRAFFIC_AWARE",
    "RoutingSample",
    "USES_REDUNDANCY",
    "Placement",
    "PlacementNotApplicable",
    "Redundancy",
    "check_slots",
    "default_redundant_experts",
    "expected_gpu_load",
    "fit_placement",
    "imbalance",
    "load_placement_file",
    "pack_items",
    "replica_counts_minmax",
]
