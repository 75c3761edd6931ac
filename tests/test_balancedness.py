"""The engines' balancedness (SGLang's, vLLM's after its PR 36304) beside moe-trace's imbalance: hand-worked
numbers through simulator.metrics, replay, rebalance, plan, the report and the CLI."""

from __future__ import annotations

import json

import numpy as np
import pytest
from sim_fixtures import random_trace, tiny_meta, write_ids
from test_sim_cli import moe_sim

from simulator import metrics, units
from simulator.rebalance import gpu_share, score_steps
from simulator.replay import ReplayConfig, replay
from traces import open_trace

EPS = metrics.SGLANG_EPSILON

# 2 MoE layers, 2 experts, top-1, 2 GPUs, expert e on GPU e (contiguous): a token's expert is its GPU.
# step 0: layer 0 experts (0, 0) -> GPU loads (2, 0); layer 1 (0, 1) -> (1, 1)
# step 1: layer 0 (1, 1) -> (0, 2); layer 1 (1, 1) -> (0, 2)
HAND_IDS = np.array([[[0], [0]], [[0], [1]], [[1], [1]], [[1], [1]]])
HAND_STEPS = np.array([0, 0, 1, 1])
# SGLang, per step: mean over layers of (mean + eps) / (busiest + eps)
SGLANG_STEPS = [((1 + EPS) / (2 + EPS) + (1 + EPS) / (1 + EPS)) / 2, ((1 + EPS) / (2 + EPS)) * 2 / 2]
# vLLM, per step: layer-summed mean over layer-summed busiest
VLLM_STEPS = [(1 + 1) / (2 + 1), (1 + 1) / (2 + 2)]


def test_definitions_by_hand():
    # vLLM PR 36304's own example: 2 layers, rank 1 gets twice rank 0's tokens in both -> 0.75 (the version
    # before it read 1.0 here)
    loads = np.array([[100.0, 200.0], [100.0, 200.0]])  # [L, G]
    layer = metrics.sglang_layer_balancedness(loads.mean(axis=1), loads.max(axis=1))
    assert metrics.sglang_step_balancedness(np.array([layer.sum()]), 2, 0) == pytest.approx([0.75])
    imbalance = loads.max(axis=1).sum() / loads.mean(axis=1).sum()
    assert metrics.vllm_step_balancedness(np.array([imbalance])) == pytest.approx([0.75])
    # where they differ: layers (2, 0) and (3, 3). SGLang averages the layers' ratios: (1/2 + 1) / 2 = 0.75;
    # vLLM divides the sums: (1 + 3) / (2 + 3) = 0.8
    loads = np.array([[2.0, 0.0], [3.0, 3.0]])
    layer = metrics.sglang_layer_balancedness(loads.mean(axis=1), loads.max(axis=1))
    assert metrics.sglang_step_balancedness(np.array([layer.sum()]), 2, 0)[0] == pytest.approx(0.75, abs=1e-5)
    assert metrics.vllm_step_balancedness(np.array([5 / 4]))[0] == pytest.approx(0.8)
    # SGLang averages over every decoder layer: one dense layer (zero counts) adds a 1.0 -> (1/2 + 1 + 1) / 3
    assert metrics.sglang_step_balancedness(np.array([layer.sum()]), 2, 1)[0] == pytest.approx(2.5 / 3,
                                                                                              abs=1e-5)
    # an idle layer reads 1.0 through SGLang's epsilon, not 0 / 0
    assert metrics.sglang_layer_balancedness(0.0, 0.0) == 1.0
    assert metrics.mean_over_steps(np.array([0.5, 1.0])) == 0.75
    assert np.isnan(metrics.mean_over_steps(np.zeros(0)))


def _hand_trace(tmp_path, hidden_layers: int = 2):
    meta = tiny_meta(layers=2, experts=2, top_k=1)
    meta.num_hidden_layers = hidden_layers  # decoder layers 2.. are dense
    return write_ids(tmp_path / "hand.h5", meta, HAND_IDS, HAND_STEPS, np.zeros(4))


def _replayed(path):
    config = ReplayConfig(num_gpus=2, gpus_per_node=2, placements=("contiguous",), fit_fraction=0.0)
    with open_trace(path) as tr:
        return replay(tr, config).placements[0]


def test_replay_reports_both_from_its_own_steps(tmp_path):
    s = _replayed(_hand_trace(tmp_path))
    assert s.steps == 2
    assert s.step_imbalance == pytest.approx((2 + 1 + 2 + 2) / (1 + 1 + 1 + 1))  # 1.75, token-weighted
    assert s.sglang_balancedness == pytest.approx(np.mean(SGLANG_STEPS), rel=1e-12)  # ~0.625
    assert s.vllm_balancedness == pytest.approx(np.mean(VLLM_STEPS), rel=1e-12)  # 7 / 12
    assert s.vllm_balancedness == pytest.approx(7 / 12) and s.sglang_balancedness == pytest.approx(0.625,
                                                                                                  abs=1e-5)
    # a third, dense decoder layer: SGLang counts it as 1.0 in every step, vLLM does not see it
    dense = _replayed(_hand_trace(tmp_path, hidden_layers=3))
    per_step = [(2 * v + 1) / 3 for v in SGLANG_STEPS]
    assert dense.sglang_balancedness == pytest.approx(np.mean(per_step), rel=1e-12)
    assert dense.vllm_balancedness == s.vllm_balancedness


def test_rebalance_scores_the_same_steps_alike(tmp_path):
    # the hand steps as per-step loads [W, L, E] with expert e on GPU e
    loads = np.array([[[2, 0], [1, 1]], [[0, 2], [0, 2]]], dtype=np.int32)
    share = gpu_share(np.array([[[0], [1]], [[0], [1]]]), 2)
    peaks, means, _, _, sglang_sums = score_steps(loads, share)
    assert metrics.sglang_step_balancedness(sglang_sums, 2, 0) == pytest.approx(SGLANG_STEPS, rel=1e-12)
    assert metrics.vllm_step_balancedness(peaks / means) == pytest.approx(VLLM_STEPS, rel=1e-12)


def test_cli_tables_and_json_carry_them(tmp_path):
    path = random_trace(tmp_path / "t.h5", tokens=1500, experts=16)
    out = moe_sim("replay", str(path), "--gpus", "4", "--gpus-per-node", "2", "--quiet")
    assert out.returncode == 0, out.stderr
    assert "SGLang" in out.stdout and "vLLM" in out.stdout and "PR 36304" in out.stdout
    assert max(len(line) for line in out.stdout.splitlines()) <= 120
    data = json.loads(moe_sim("replay", str(path), "--gpus", "4", "--placements", "contiguous",
                              "--json").stdout)
    placement = data["placements"][0]
    # vLLM's is the mean of 1 / each step's imbalance, over the same series the JSON carries
    series = np.asarray(placement["step_imbalance_series"])
    assert placement["vllm_balancedness"] == pytest.approx(float(np.mean(1 / series)), rel=1e-12)
    assert 0 < placement["sglang_balancedness"] <= 1
    row = next(line.split() for line in out.stdout.splitlines()[::-1] if line.startswith(" contiguous"))
    assert row[-2:] == [units.sig(placement[f"{e}_balancedness"]) for e in ("sglang", "vllm")]

    refits = ("rebalance", str(path), "--gpus", "4", "--rebalance-every", "5", "--window", "5")
    out = moe_sim(*refits, "--json")
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout)["results"][0]
    for name in ("fixed", "rebalanced", "oracle"):
        assert 0 < result[name]["sglang_balancedness"] <= 1 and 0 < result[name]["vllm_balancedness"] <= 1
    text = moe_sim(*refits, "--quiet").stdout
    rebalanced = result["rebalanced"]
    assert " / ".join(units.sig(rebalanced[f"{e}_balancedness"]) for e in ("sglang", "vllm")) in text

    plan = ("plan", str(path), "--target-tokens-per-s", "1e3", "--gpus", "2,4", "--gpus-per-node", "2",
            "--tokens-per-step", "0")
    out = moe_sim(*plan, "--json")
    assert out.returncode == 0, out.stderr
    rec = json.loads(out.stdout)["recommendation"]
    assert 0 < rec["sglang_balancedness"] <= 1 and 0 < rec["vllm_balancedness"] <= 1
    text = moe_sim(*plan, "--quiet").stdout
    assert f"SGLang balancedness {units.sig(rec['sglang_balancedness'])}, vLLM balancedness" in text
