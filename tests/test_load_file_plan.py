"""Load files: read in every accepted form, and plan / report from one (--load-file), saying what they
model."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from simulator.interop.loadplan import trace_or_load_file
from traces import open_trace
from traces.errors import InputError
from traces.loadfile import LoadFile, read_load_file, write_load_file

ROOT = Path(__file__).resolve().parent.parent
COUNTS = ROOT / "data" / "olmoe_expert_counts.json"


def moe_sim(*args: str | Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "cli.py"), *map(str, args)], capture_output=True,
                          text=True, cwd=ROOT, timeout=300)


def test_load_file_forms(tmp_path: Path) -> None:
    olmoe = read_load_file(COUNTS)
    assert olmoe.layers == [0, 7,
                            15] and olmoe.num_experts == 64 and olmoe.model_id == "allenai/OLMoE-1B-7B-0924"
    path = write_load_file(tmp_path / "l.json", olmoe)
    again = read_load_file(path)
    np.testing.assert_array_equal(again.load, olmoe.load)
    assert again.layers == olmoe.layers and again.top_k == 8
    per_layer = tmp_path / "per-layer.json"
    per_layer.write_text(json.dumps({"2": [1, 2, 3], "0": [4, 5, 6]}))
    loaded = read_load_file(per_layer)
    assert loaded.layers == [0, 2]
    np.testing.assert_array_equal(loaded.load, [[4, 5, 6], [1, 2, 3]])
    per_layer.write_text(json.dumps({"2": [1, 2, 3], "0": [4, 5]}))
    with pytest.raises(InputError, match="per-layer load JSON"):
        read_load_file(per_layer)
    csv = tmp_path / "l.csv"
    csv.write_text("layer,expert,count\n3,0,5\n3,1,7\n4,1,2\n")
    table = read_load_file(csv)
    assert table.layers == [3, 4]
    np.testing.assert_array_equal(table.load, [[5, 7], [0, 2]])
    for text, fragment in (("layer,expert\n1,2\n", "columns"), ("layer,expert,count\n1,x,3\n", "line 2"),
                           ("layer,expert,count\n", "no counts")):
        csv.write_text(text)
        with pytest.raises(InputError, match=fragment):
            read_load_file(csv)
    bad = tmp_path / "bad.json"
    for payload, fragment in (({"format": "moe-trace-load", "version": 1, "layers": [0], "load": [[1, -2]]},
                               "non-negative"), ({"format": "moe-trace-load", "version": 9}, "version 9"),
                              ({"hello": 1}, "not a load file")):
        bad.write_text(json.dumps(payload))
        with pytest.raises(InputError, match=fragment):
            read_load_file(bad)
    with pytest.raises(InputError, match="already exists"):
        write_load_file(path, LoadFile(layers=[0], load=np.ones((1, 4)), source="x"))


def test_load_file_becomes_steps_with_its_expert_shares() -> None:
    with trace_or_load_file((), str(COUNTS), tokens=40_000) as (paths, note):
        assert (note is not None
                and "cannot show per-step imbalance, co-selection and all-to-all bytes" in note)
        with open_trace(paths) as trace:
            ids = trace.read_all(["expert_ids"]).expert_ids
            assert ids is not None
            assert trace.metadata.model_id == "allenai/OLMoE-1B-7B-0924"
    counts = read_load_file(COUNTS).load
    for row, layer in enumerate([0, 7, 15]):  # the counted layers keep their experts' shares
        share = np.bincount(ids[:, layer].ravel(), minlength=64) / ids[:, layer].size
        want = counts[row] / counts[row].sum()
        assert np.abs(share - want).max() < 0.02
    with pytest.raises(InputError, match="not both"), trace_or_load_file(("t.h5",), str(COUNTS)):
        pass
    with pytest.raises(InputError, match="64 experts"), trace_or_load_file((), str(COUNTS), model="mixtral"):
        pass


def test_plan_and_report_from_load_file(tmp_path: Path) -> None:
    result = moe_sim("plan", "--load-file", COUNTS, "--load-tokens", "30000", "--target-tokens-per-s", "1000",
                     "--gpus", "8", "--tokens-per-gpu", "64", "--placements", "balanced",
                     "--redundant-experts", "0", "--json")
    assert result.returncode == 0, result.stderr
    data = json.loads(result.stdout)
    assert "modelled, not measured" in data["load_file_note"]
    assert data["recommendation"] is not None
    out = tmp_path / "r.md"
    result = moe_sim("report", "--load-file", COUNTS, "--load-tokens", "20000", "-o", out, "--gpus", "8",
                     "--quiet")
    assert result.returncode == 0, result.stderr
    assert "cannot show per-step imbalance, co-selection and all-to-all bytes" in out.read_text()
    result = moe_sim("plan", "--target-tokens-per-s", "1000")
    assert result.returncode == 2 and "--load-file" in result.stderr
