"""`moe-sim replay` and `moe-sim plan` through a subprocess: tables, JSON, one-line errors with exit code
2."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from sim_fixtures import random_trace

from simulator import units

ROOT = Path(__file__).resolve().parents[1]


def moe_sim(*args: str, columns: int | None = None) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    env.pop("COLUMNS", None)
    if columns is not None:
        env["COLUMNS"] = str(columns)
    return subprocess.run([sys.executable, str(ROOT / "cli.py"), *args], capture_output=True, text=True,
                          cwd=ROOT, timeout=300, env=env)


def test_replay_table_and_json(tmp_path):
    path = random_trace(tmp_path / "t.h5", tokens=1500, experts=16)
    out = moe_sim("replay", str(path), "--gpus", "4", "--gpus-per-node", "2", "--per-layer", "--quiet")
    assert out.returncode == 0, out.stderr
    for word in ("contiguous", "replicated+4", "coactivation+4", "imbalance", "Per layer"):
        assert word in out.stdout
    out = moe_sim("replay", str(path), "--gpus", "4", "--placements", "balanced,replicated", "--json")
    assert out.returncode == 0, out.stderr
    data = json.loads(out.stdout)
    assert [p["label"] for p in data["placements"]] == ["balanced", "replicated+4"]
    timing = data["placements"][0]["timings"][0]
    assert timing["hardware"] == "h100"
    # --json stays complete: the breakdown, percentiles and per-layer rows the tables leave out
    assert set(timing["breakdown"]) == {"compute", "weights", "dispatch", "combine"}
    assert {"p50", "p95", "p99", "mean"} <= set(data["placements"][0]["step_imbalance_percentiles"])
    assert len(data["placements"][0]["per_layer"]) == len(timing["per_layer"]) == 3  # random_trace: 3 layers


def test_replay_table_fits_120_columns(tmp_path):
    path = random_trace(tmp_path / "t.h5", tokens=1500, experts=16)
    for columns in (None, 120):  # a pipe without COLUMNS also gets 120
        out = moe_sim("replay", str(path), "--gpus", "4", "--gpus-per-node", "2", "--quiet", columns=columns)
        assert out.returncode == 0, out.stderr
        lines = out.stdout.splitlines()
        assert max(len(line) for line in lines) <= 120, out.stdout
        # no header or cell cut short with an ellipsis
        assert not any("\u2026" in line for line in lines), out.stdout
    data = json.loads(moe_sim("replay", str(path), "--gpus", "4", "--gpus-per-node", "2", "--json").stdout)
    # one line per placement in each table; its cells are the JSON numbers through the shared formatter
    rows = [line.split() for line in lines if line.split() and line.split()[0] == "replicated+4"]
    assert len(rows) == 3
    summary = data["placements"][3]
    headline, breakdown, balance = rows
    assert headline[1:5] == [units.sig(summary["step_imbalance"]),
                             units.sig(summary["step_imbalance_percentiles"]["p95"]),
                             units.share(summary["leave_gpu_share"]),
                             units.share(summary["leave_node_share"])]
    compute = summary["timings"][0]["breakdown"]["compute"]
    assert " ".join(breakdown[1:3]) == units.seconds(compute)
    assert balance[1:] == [units.sig(summary[k]) for k in ("step_imbalance", "aggregate_imbalance",
                                                           "sglang_balancedness", "vllm_balancedness")]
    out = moe_sim("plan", str(path), "--target-tokens-per-s", "1e3", "--gpus", "2,4", "--gpus-per-node", "2",
                  "--hardware", "h100,b200", "--redundant-experts", "0,4", "--tokens-per-step", "0", "--all",
                  "--quiet", columns=120)
    assert out.returncode == 0, out.stderr
    assert max(len(line) for line in out.stdout.splitlines()) <= 120, out.stdout
    assert "\u2026" not in out.stdout


def test_replay_bad_inputs(tmp_path):
    path = random_trace(tmp_path / "t.h5", tokens=300, experts=16)
    placement = tmp_path / "p.json"
    placement.write_text(json.dumps({"num_experts": 8, "layers": [[0, 1, 2, 3], [4, 5, 6, 7]]}))
    other_model = tmp_path / "q.json"
    other_model.write_text(json.dumps({"model_id": "mistralai/Mixtral-8x7B-v0.1",
                                       "layers": [list(range(8)), list(range(8, 16))]}))
    hw = tmp_path / "gpu.json"
    hw.write_text(json.dumps({"name": "x", "bf16_flops": 1e15}))
    cases = [
        (["--gpus", "2", "--placements", "replicated", "--redundant-experts", "17"], "17 redundant slots"),
        (["--gpus", "12", "--gpus-per-node", "8"], "not divisible into nodes"),
        (["--capacity-factor", "-1"], "capacity-factor"),
        (["--gpus", "2", "--placements", f"file:{placement}"], "8 experts"),
        (["--gpus", "2", "--placements", f"file:{other_model}"], "Mixtral"),
        (["--hardware", str(hw)], "missing field"),
        (["--placements", "nope"], "unknown policy"),
    ]
    for extra, message in cases:
        out = moe_sim("replay", str(path), "--quiet", *extra)
        assert out.returncode == 2, (extra, out.stderr)
        assert out.stderr.startswith("error:") and message in out.stderr, out.stderr
        assert "Traceback" not in out.stderr
    out = moe_sim("replay", str(tmp_path / "missing.h5"))
    assert out.returncode == 2 and "no such file" in out.stderr


def test_plan_json(tmp_path):
    path = random_trace(tmp_path / "t.h5", tokens=1500, experts=16)
    out = moe_sim("plan", str(path), "--target-tokens-per-s", "1e3", "--gpus", "2,4", "--gpus-per-node", "2",
                  "--hardware", "h100,b200", "--redundant-experts", "0,4", "--tokens-per-step", "0", "--json")
    assert out.returncode == 0, out.stderr
    data = json.loads(out.stdout)
    # 2 GPU counts x (contiguous, balanced, replicated R=0 and 4) x 2 GPU types
    assert len(data["candidates"]) == 2 * 4 * 2
    rec = data["recommendation"]
    assert rec["num_gpus"] == 2
    # the reasons: the pick and by how much it meets the target, its step time, memory, and how it was ranked
    first = data["reasons"][0]
    assert first.startswith(f"2 x {rec['hardware']}, {rec['placement']}, recorded steps: ")
    assert f"{rec['tokens_per_s']:,.0f} tokens/s meets the target 1,000 tokens/s" in first
    assert data["reasons"][1].startswith(f"step time mean {rec['step_ms']:.3g} ms, p95 "
                                         f"{rec['step_ms_p95']:.3g} ms")
    assert data["reasons"][2].startswith("memory fits with")
    assert any(r.startswith("ranked by fewest GPUs, then mean step time: prices were not given for "
                            "b200, h100")
               for r in data["reasons"])


def test_hardware_lists_presets_sources_and_fields(tmp_path):
    out = moe_sim("hardware", "--json")
    assert out.returncode == 0, out.stderr
    data = json.loads(out.stdout)
    by_name = {p["name"]: p for p in data["presets"]}
    assert set(by_name) == {"a100", "h100", "h200", "b200", "mi300x"}
    assert by_name["h200"]["priced_by"] == "measured profile h200-torch-grouped-mm"
    assert (by_name["h100"]["priced_by"]
            == "extrapolated (from h200 by datasheet ratios) of profile h200-torch-grouped-mm")
    assert all(p["source"] for p in data["presets"]) and "scale_up_latency" in data["fields"]
    bad = tmp_path / "gpu.json"
    bad.write_text(json.dumps({"name": "x", "bf16_flop": 1e15}))
    trace = random_trace(tmp_path / "t.h5", tokens=200)
    err = moe_sim("replay", str(trace), "--hardware", str(bad), "--quiet")
    assert err.returncode == 2 and "valid fields are name, bf16_flops" in err.stderr


def test_replay_states_the_step_size_and_warns_on_steps_it_cannot_fill(tmp_path):
    import dataclasses

    import numpy as np
    from sim_fixtures import tiny_meta, write_ids

    # recorded steps of 2, 4 and 6 tokens (12 tokens, 1 layer, top-1), all scored
    steps = np.repeat([0, 1, 2], [2, 4, 6])
    meta = dataclasses.replace(tiny_meta(1, 4, 1), model_id="olmoe-tiny")
    path = write_ids(tmp_path / "s.h5", meta, (np.arange(12) % 4).reshape(12, 1, 1), steps, np.ones(12))
    args = ("replay", str(path), "--gpus", "2", "--gpus-per-node", "2", "--placements", "contiguous",
            "--fit-fraction", "0", "--quiet")
    out = moe_sim(*args)
    assert out.returncode == 0, out.stderr
    first = out.stdout.splitlines()[0]
    assert (first == "Steps: the recorded forward passes; 3 scored steps of 4.0 tokens on average (min 2, "
                     "max 6).")
    assert "note: olmoe-tiny is a built-in tiny model" in out.stdout and "warning" not in out.stdout
    data = json.loads(moe_sim(*args, "--json").stdout)
    assert data["placements"][0]["step_tokens"] == {"mean": 4.0, "min": 2.0, "max": 6.0}
    big = moe_sim(*args, "--tokens-per-step", "64")
    assert big.returncode == 0, big.stderr
    assert "Steps: 64 tokens of one phase (--tokens-per-step); 1 scored steps of 12.0 tokens" in big.stdout
    assert ("warning: --tokens-per-step 64 is more than the 12 scored tokens: every step is partial"
            in big.stdout)
    fits = moe_sim(*args, "--tokens-per-step", "6")
    assert "warning" not in fits.stdout and "2 scored steps of 6.0 tokens" in fits.stdout


def test_tiny_model_rule_matches_the_built_in_models():
    import pytest

    pytest.importorskip("torch")
    from recorder.builtin_models import BUILTIN_MODELS
    from simulator.replay.render import is_tiny_builtin

    assert {n for n in BUILTIN_MODELS if is_tiny_builtin(n)} == set(BUILTIN_MODELS) - {"olmoe-1b-7b-random"}
    assert not is_tiny_builtin("allenai/OLMoE-1B-7B-0924")


def test_replay_uneven_layout_and_rounded_default_redundancy(tmp_path):
    """16 experts on 7 GPUs: every default policy replays (uneven slots), and the default redundancy (one per
    GPU, 7) is rounded to 5 so that 21 slots divide over the 7 GPUs, which the output says."""
    path = random_trace(tmp_path / "t.h5", tokens=400, experts=16)
    out = moe_sim("replay", str(path), "--gpus", "7", "--quiet")
    assert out.returncode == 0, out.stderr
    assert ("default redundancy rounded from 7 (one per GPU) to 5: 16 experts + 5 = 21 slots, 3 per GPU"
            in out.stdout)
    assert "replicated+5" in out.stdout and "balanced" in out.stdout
    data = moe_sim("replay", str(path), "--gpus", "7", "--quiet", "--json")
    assert data.returncode == 0 and json.loads(data.stdout)["config"]["redundant_experts"] == 5
    assert "rounded from 7" in data.stderr
