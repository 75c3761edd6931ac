"""Expert placements: which physical slot on which GPU holds which expert, per layer.

- `core`: the `Placement` type, its checks, and the expected load per GPU;
- `packing`: the Numba packing kernels (plain arrays, no I/O);
- `policies`: the pure policies, from a load [L, E] to slots [L, G, S];
- `files`: `fit_placement` by name or `file:PATH`, and the reading of placement files.
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
    USES_REDUNDANCY,
    Redundancy,
    default_redundant_experts,
)

__all__ = [
    "NEEDS_COSELECTION",
    "POLICIES",
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
