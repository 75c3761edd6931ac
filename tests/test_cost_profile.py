"""Measured cost profiles: the expert-time model at its grid points, monotone in the counts, kernel == NumPy
twin, replay priced by a profile as a hand calculation says, validation,
round trip."""

from __future__ import annotations

import copy
import dataclasses
import json
import subprocess
from pathlib import Path

import numpy as np
import pytest
import yaml
from sim_fixtures import random_ids, write_ids

from simulator import expert_time as X
from simulator import kernels as K
from simulator.cost_model import ROOFLINE, cost_row, pricing_for
from simulator.hardware import PRESETS, load_hardware
from simulator.profiles import GRID_LOG2_EXPERTS, GRID_ROWS, load_profile, write_profile
from simulator.replay import ReplayConfig, replay
from traces import open_trace
from traces.errors import InputError
from traces.presets import preset_metadata

ROOT = Path(__file__).resolve().parents[1]
TILE, FIXED, PER = 64, 1e-5, 2e-9
META = preset_metadata("olmoe-1b-7b")


def hand_table() -> np.ndarray:
    """[9, 34] monotone: 5 us + 2 us per expert + 10 ns per padded row."""
    x = X.grid_experts()[:, None]
    w = X.grid_rows()[None, :]
    return X.fill_table(5e-6 + x * 2e-6 + w * 1e-8)


def profile_dict() -> dict:
    return {
        "format": "moe-trace-profile", "version": 2, "hardware": "h200", "backend": "torch-grouped-mm",
        "created_at": "2026-01-01T00:00:00+00:00", "tool_version": "test",
        "shapes": [{"name": "olmoe-1b-7b", "hidden_size": 2048, "expert_intermediate_size": 1024,
                    "activation": "swiglu",
                    "expert": {"grid_log2_experts": list(range(9)), "grid_rows": list(GRID_ROWS),
                               "gemm_seconds": hand_table().tolist(), "tile_rows": TILE,
                               "fixed_seconds": FIXED, "per_assignment_seconds": PER}}],
        "communication": {"source": "deepep"},
    }


def write_dict(path: Path, data: dict) -> Path:
    path.write_text(yaml.safe_dump(data, sort_keys=False, width=200))
    return path


@pytest.fixture
def profile_path(tmp_path) -> Path:
    return write_dict(tmp_path / "hand.yaml", profile_dict())


def h200(path: Path | None):
    return dataclasses.replace(PRESETS["h200"], profile=None if path is None else str(path))


def test_model_reproduces_profile_at_grid_points(profile_path):
    work = load_profile(profile_path).shapes[0].expert
    table = hand_table()
    np.testing.assert_array_equal(work.gemm_seconds, table)
    for i in GRID_LOG2_EXPERTS:
        for j, rows in enumerate(GRID_ROWS):
            assert X.gemm_lookup(table, 2**i, rows) == pytest.approx(table[i, j], rel=1e-9)
            if rows % 2**i == 0 and (rows // 2**i) % TILE == 0:  # x experts, rows / x each, tile multiples
                counts = np.full(2**i, rows // 2**i)
                assert X.expert_seconds(counts, work) == pytest.approx(FIXED + PER * rows + table[i, j],
                                                                       rel=1e-9)
    assert X.expert_seconds(np.zeros(64), work) == FIXED


def test_monotone_in_counts_and_kernel_matches_numpy(profile_path):
    work = load_profile(profile_path).shapes[0].expert
    row = cost_row(h200(profile_path), META)
    assert row[K.C_PROFILED] == 1.0 and row[K.C_TILE] == TILE
    rng = np.random.default_rng(0)
    for trial in range(40):
        n = (8, 64, 300)[trial % 3]  # 300 experts: past the grid's 256
        scale = (3, 200, 5000)[trial % 3]  # 5000 x 64: past the grid's 131072 rows
        counts = rng.integers(0, scale, n) * (rng.random(n) < 0.7)
        base = X.expert_seconds(counts, work)
        x, a = int((counts > 0).sum()), float(counts.sum())
        w = float(sum(np.ceil(c / TILE) * TILE for c in counts if c > 0))
        assert K.profiled_expert_seconds(row, x, w, a) == pytest.approx(base, rel=1e-12)
        for e in rng.choice(n, size=min(n, 12), replace=False):
            bumped = counts.copy()
            bumped[e] += 1
            assert X.expert_seconds(bumped, work) >= base
        zero = np.flatnonzero(counts == 0)
        if zero.size:  # a new expert with one row
            bumped = counts.copy()
            bumped[zero[0]] = 1
            assert X.expert_seconds(bumped, work) > base


def _trace(tmp_path, tokens=600):
    meta = preset_metadata("olmoe-1b-7b", source="synthetic", has_token_ids=False, has_weights=False,
                           created_at="2026-01-01T00:00:00+00:00", tool_version="test")
    ids = random_ids(np.random.default_rng(2), tokens, meta.num_moe_layers, meta.num_experts, meta.top_k,
                     skew=1.2)
    path = write_ids(tmp_path / "olmoe.h5", meta, ids, np.zeros(tokens), np.zeros(tokens))  # all prefill
    return path, ids


def _replay(path, gpu, tps):
    config = ReplayConfig(num_gpus=1, gpus_per_node=1, hardware=gpu, placements=("contiguous",),
                          fit_fraction=0.0, tokens_per_step=tps)
    with open_trace(path) as tr:
        return replay(tr, config).placements[0]


def test_profile_prices_replay_as_hand_calculation(tmp_path, profile_path):
    tps = 256
    path, ids = _trace(tmp_path)
    work = load_profile(profile_path).shapes[0].expert
    expected = []
    for s in range(0, ids.shape[0], tps):  # one GPU: no dispatch or combine, every expert on it
        step = ids[s: s + tps]
        expected.append(sum(X.expert_seconds(np.bincount(step[:, layer].ravel(), minlength=64), work)
                            for layer in range(ids.shape[1])))
    assert max(np.bincount(ids[:tps, 0].ravel())) > TILE  # some experts take more than one tile
    summary = _replay(path, h200(profile_path), tps)
    assert summary.steps == 3
    np.testing.assert_allclose(summary.step_time_series[0], expected, rtol=1e-6)
    assert summary.timings[0].breakdown["dispatch"] == summary.timings[0].breakdown["combine"] == 0.0
    assert summary.timings[0].priced_by["expert_time"] == "measured profile hand"
    # a profile file given as hardware: the h200 preset named after the file
    spec = load_hardware(str(profile_path))
    assert (spec.name, spec.profile, spec.hbm_bandwidth) == ("hand", str(profile_path),
                                                             PRESETS["h200"].hbm_bandwidth)
    assert pricing_for(spec, META).source == "measured profile hand"
    assert load_hardware(str(profile_path), cost_model="roofline").profile is None
    # the same profile moved to an H100 (less HBM bandwidth, same FLOP/s): derived, never faster
    h100 = _replay(path, dataclasses.replace(PRESETS["h100"], profile=str(profile_path)), tps)
    source = h100.timings[0].priced_by["expert_time"]
    assert source.startswith("extrapolated") and "from h200" in source and source.endswith("of profile hand")
    assert (np.asarray(h100.step_time_series[0]) > np.asarray(expected)).all()
    roof = _replay(path, h200(None), tps)
    assert roof.timings[0].priced_by["expert_time"] == ROOFLINE
    assert not np.allclose(roof.step_time_series[0], expected, rtol=1e-3)


def _drop(key):
    def edit(d):
        if key == "shapes":
            del d["shapes"]
        else:
            del d["shapes"][0]["expert"][key]
    return edit


def _cell(value):
    def edit(d):
        d["shapes"][0]["expert"]["gemm_seconds"][2][3] = value
    return edit


def _set(value):
    def edit(d):
        d["version"] = value
    return edit


def _short_table(d):
    d["shapes"][0]["expert"]["gemm_seconds"] = d["shapes"][0]["expert"]["gemm_seconds"][:8]


def _negative_fixed(d):
    d["shapes"][0]["expert"]["fixed_seconds"] = -1e-6


BAD = [
    ("no_tile", _drop("tile_rows"), "missing field tile_rows"),
    ("no_shapes", _drop("shapes"), "missing field shapes"),
    ("negative", _cell(-1e-6), "gemm_seconds holds negative, zero or non-finite"),
    ("nan", _cell(float("nan")), "gemm_seconds holds negative, zero or non-finite"),
    ("inf", _cell(float("inf")), "gemm_seconds holds negative, zero or non-finite"),
    ("shape", _short_table, r"gemm_seconds must have shape \[9, 34\], got \[8, 34\]"),
    ("version", _set(99), "unknown profile version 99"),
    ("fixed", _negative_fixed, "fixed_seconds must be a finite non-negative number"),
]


@pytest.mark.parametrize(("name", "edit", "message"), BAD, ids=[b[0] for b in BAD])
def test_bad_profile_raises_input_error(tmp_path, name, edit, message):
    data = copy.deepcopy(profile_dict())
    edit(data)
    path = write_dict(tmp_path / f"bad_{name}.yaml", data)
    with pytest.raises(InputError, match=message):
        load_profile(path)


def moe_sim(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([str(ROOT / ".venv" / "bin" / "moe-sim"), *args], capture_output=True, text=True,
                          cwd=ROOT, timeout=300)


def test_cli_bad_profile_is_one_line_error(tmp_path, profile_path):
    trace, _ = _trace(tmp_path, tokens=64)
    data = profile_dict()
    data["version"] = 99
    bad = write_dict(tmp_path / "bad.yaml", data)
    out = moe_sim("replay", str(trace), "--hardware", str(bad), "--gpus", "1", "--gpus-per-node", "1")
    assert out.returncode == 2, out.stderr
    assert "Traceback" not in out.stderr
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and "unknown profile version 99" in lines[0]
    good = moe_sim("replay", str(trace), "--hardware", str(profile_path), "--gpus", "1",
                   "--gpus-per-node", "1", "--placements", "contiguous", "--fit-fraction", "0", "--json")
    assert good.returncode == 0, good.stderr
    timing = json.loads(good.stdout)["placements"][0]["timings"][0]
    assert timing["hardware"] == "hand" and timing["priced_by"]["expert_time"] == "measured profile hand"


def test_write_profile_round_trips(tmp_path, profile_path):
    first = load_profile(profile_path)
    write_profile(first, tmp_path / "out" / "a.yaml")
    second = load_profile(tmp_path / "out" / "a.yaml")
    write_profile(second, tmp_path / "out" / "b.yaml")
    third = load_profile(tmp_path / "out" / "b.yaml")
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["a.yaml", "b.yaml"]  # no .partial left
    for p in (second, third):
        assert (p.hardware, p.backend, p.created_at, p.tool_version, p.communication) == (
            first.hardware, first.backend, first.created_at, first.tool_version, first.communication)
        a, b = first.shapes[0], p.shapes[0]
        assert (a.hidden_size, a.expert_intermediate_size, a.activation, a.non_expert) == (
            b.hidden_size, b.expert_intermediate_size, b.activation, b.non_expert)
        assert (b.expert.tile_rows, b.expert.fixed_seconds,
                b.expert.per_assignment_seconds) == (TILE, FIXED, PER)
        # written to 5 significant digits
        np.testing.assert_allclose(b.expert.gemm_seconds, a.expert.gemm_seconds, rtol=5e-5)
    np.testing.assert_array_equal(third.shapes[0].expert.gemm_seconds, second.shapes[0].expert.gemm_seconds)
    assert third.label == "b" and first.label == "hand"


def test_undecodable_hardware_file_is_input_error(tmp_path):
    bad = tmp_path / "binary.yaml"
    bad.write_bytes(b"\xff\xfe\x00 not text")
    with pytest.raises(InputError, match="binary.yaml"):
        load_hardware(str(bad))


def test_hardware_file_pointing_at_a_profile_is_not_a_profile(tmp_path):
    write_dict(tmp_path / "h200-moe-trace-profile.yaml", profile_dict())
    hw = dict(PRESETS["h200"].to_dict(), name="mygpu", profile="h200-moe-trace-profile.yaml")
    path = write_dict(tmp_path / "mygpu.yaml", hw)
    spec = load_hardware(str(path))
    assert spec.name == "mygpu" and spec.profile == str((tmp_path / "h200-moe-trace-profile.yaml").resolve())
