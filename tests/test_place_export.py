"""moe-sim place: one placement from a trace or a load file, exported for SGLang, TensorRT-LLM, DeepSeek EPLB
and vLLM; every export reads back to the same slots, and so does the file: placement."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from simulator.interop.export import TARGETS, logical_to_physical, read_export, vllm_strategy
from simulator.placement import load_placement_file
from traces.synthetic import SynthConfig, write_synthetic

ROOT = Path(__file__).resolve().parent.parent


def moe_sim(*args: str | Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "cli.py"), *map(str, args)], capture_output=True,
                          text=True, cwd=ROOT, timeout=300)


@pytest.fixture(scope="module")
def trace(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("place") / "t.h5"
    write_synthetic(path, SynthConfig(tokens=6000, seed=2, sequences=6))
    return path


@pytest.mark.parametrize("target", TARGETS)
def test_export_round_trip(trace: Path, tmp_path: Path, target: str) -> None:
    out = tmp_path / "p.json"
    result = moe_sim("place", trace, "--gpus", "8", "--policy", "replicated", "--redundant-experts", "8",
                     "-o", out, "--export", target, "--json")
    assert result.returncode == 0, result.stderr
    summary = json.loads(result.stdout)
    doc = json.loads(out.read_text())
    slots = np.asarray(doc["layers"])
    assert slots.shape == (16, 8, 9)
    back = read_export(summary["export"], target, num_gpus=8, moe_layers=list(range(16)))
    np.testing.assert_array_equal(back, slots)
    placement = load_placement_file(out, num_experts=64, num_layers=16)  # the file: placement
    np.testing.assert_array_equal(placement.slots, slots)
    assert summary["expected_imbalance_worst"] < 1.05


def test_eplb_arrays_agree(trace: Path, tmp_path: Path) -> None:
    out = tmp_path / "p.json"
    assert moe_sim("place", trace, "--gpus", "4", "--redundant-experts", "4", "-o", out, "--export", "eplb"
                   ).returncode == 0
    doc = json.loads((tmp_path / "p.eplb.json").read_text())
    phy2log, log2phy, logcnt = (np.asarray(doc[k]) for k in ("phy2log", "log2phy", "logcnt"))
    assert phy2log.shape == (16, 68) and logcnt.sum(axis=1).tolist() == [68] * 16
    for layer in range(16):
        for e in range(64):
            slots = log2phy[layer, e][log2phy[layer, e] >= 0]
            assert slots.size == logcnt[layer, e] and (phy2log[layer, slots] == e).all()
    l2p, cnt = logical_to_physical(phy2log, 64)
    np.testing.assert_array_equal(l2p, log2phy)


def test_vllm_export_says_what_it_can_load(trace: Path, tmp_path: Path) -> None:
    out = tmp_path / "c.json"
    result = moe_sim("place", trace, "--gpus", "8", "--policy", "contiguous", "-o", out, "--export", "vllm")
    assert result.returncode == 0, result.stderr
    doc = json.loads((tmp_path / "c.vllm.json").read_text())
    assert doc["engine_args"]["expert_placement_strategy"] == "linear" and doc["reproduces_placement"]
    assert "loads no expert map" in doc["cannot_load"]
    rr = np.arange(64).reshape(8, 8).T[None].repeat(2, axis=0)
    assert vllm_strategy(rr) == "round_robin"
    result = moe_sim("place", trace, "--gpus", "8", "--redundant-experts", "8", "-o", out, "--export", "vllm",
                     "--force")
    assert "not this placement" in result.stdout
    assert json.loads((tmp_path / "c.vllm.json").read_text())["engine_args"]["eplb_config"] == {
        "num_redundant_experts": 8}


def test_place_from_load_file(tmp_path: Path) -> None:
    counts = ROOT / "data" / "olmoe_expert_counts.json"
    out = tmp_path / "p.json"
    result = moe_sim("place", counts, "--gpus", "4", "--policy", "balanced", "-o", out, "--export", "trtllm")
    assert result.returncode == 0, result.stderr
    assert "cannot show per-step imbalance, co-selection and all-to-all bytes" in result.stdout
    doc = json.loads(out.read_text())
    assert doc["moe_layers"] == [0, 7, 15] and doc["fitted_on"]["kind"] == "load file"
    back = read_export(tmp_path / "p.trtllm.yaml", "trtllm", num_gpus=4, moe_layers=[0, 7, 15])
    np.testing.assert_array_equal(back, doc["layers"])


def test_place_bad_inputs(trace: Path, tmp_path: Path) -> None:
    counts = ROOT / "data" / "olmoe_expert_counts.json"
    out = tmp_path / "p.json"
    cases = [
        (("place", counts, "--gpus", "4", "--policy", "coactivation", "-o", out), "needs co-selection"),
        (("place", counts, "--gpus", "4", "--model", "olmoe", "-o", out), "no row for MoE layer 1"),
        (("place", trace, "--gpus", "6", "--policy", "contiguous", "-o", out, "--export", "sglang"),
         "empty slot"),
        (("place", tmp_path / "missing.json", "--gpus", "4", "-o", out), "no such file"),
    ]
    for args, fragment in cases:
        result = moe_sim(*args)
        assert result.returncode == 2, result.stderr
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and fragment in lines[0], result.stderr
        assert not out.exists() and not (tmp_path / "p.sglang.json").exists()
