"""docs/cost-model.md's worked example, recomputed from the preset so the page cannot drift from the code."""

from __future__ import annotations

import re
from pathlib import Path

from simulator.cost_model import expert_weight_bytes, model_vector
from simulator.kernels import M_DISPATCH_BYTES
from traces.presets import preset_metadata

DOC = Path(__file__).resolve().parent.parent / "docs" / "cost-model.md"


def test_olmoe_worked_example_matches_the_preset() -> None:
    line = next(x for x in DOC.read_text().splitlines() if x.startswith("For OLMoE-1B-7B (h = "))
    m = re.search(r"h = (\d+), f = (\d+).*F = ([\d.]+) MFLOP, W_e = ([\d.]+) MB, D = C = (\d+) KiB", line)
    assert m, line
    meta = preset_metadata("olmoe-1b-7b")
    assert (int(m[1]), int(m[2])) == (meta.hidden_size, meta.expert_intermediate_size)
    assert f"{meta.flops_per_assignment / 1e6:.1f}" == m[3]  # 2 x 3 x 2048 x 1024 = 12.6 MFLOP
    assert f"{expert_weight_bytes(meta) / 1e6:.1f}" == m[4]
    assert model_vector(meta, None)[M_DISPATCH_BYTES] / 1024 == int(m[5])
