"""`moe-sim calibrate`: the expert-work backends against a plain loop, the grids, the CPU pipeline end to end
into a profile that replay prices with, and the refusals (no CUDA, interrupted runs)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from sim_fixtures import random_trace

from simulator import profiles
from simulator.calibrate import run
from simulator.calibrate.expert_work import (
    ExpertShape,
    assignments_from_counts,
    make_backend,
    reference_output,
)
from simulator.calibrate.timing import CpuTimer

ROOT = Path(__file__).resolve().parent.parent
CPU = torch.device("cpu")


def _moe_sim(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", "import cli; cli.moe_sim()", *args], cwd=cwd,
                          capture_output=True, text=True, timeout=600,
                          env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"})


@pytest.mark.parametrize("backend,activation", [("torch-grouped-mm", "swiglu"), ("torch-grouped-mm", "mlp"),
                                                ("transformers", "swiglu")])
def test_backends_compute_the_expert_layer(backend: str, activation: str) -> None:
    shape = ExpertShape("t", 64, 32, activation)
    b = make_backend(backend, shape, 8, CPU)
    work = assignments_from_counts(np.array([3, 0, 5, 1, 0, 0, 7, 2]), 64, CPU, np.random.default_rng(0),
                                   top_k=2)
    out = b.run(work).float()
    ref = reference_output(b, work)
    assert out.shape == ref.shape
    assert torch.allclose(out, ref, atol=0.03 * float(ref.abs().max()), rtol=0.05)


def test_grids_cover_the_model_and_stay_on_the_profile_grid() -> None:
    full, quick = run.gemm_points(64, run.Plan(False)), run.gemm_points(64, run.Plan(True))
    assert set(quick) < set(full)
    for i, j in full:
        assert i in profiles.GRID_LOG2_EXPERTS and 0 <= j < len(profiles.GRID_ROWS)
        per_expert, rest = divmod(profiles.GRID_ROWS[j], 2**i)
        assert rest == 0 and 1 <= per_expert <= 2**run.MAX_ROWS_PER_EXPERT_LOG2  # 1 .. 16k rows per expert
    assert any(profiles.GRID_ROWS[j] % 3 == 0 for _, j in full)  # the 3 x 2^k points inside each octave
    assert not any(profiles.GRID_ROWS[j] % 3 == 0 for _, j in quick)
    assert max(i for i, _ in full) == 6 and max(i for i, _ in run.gemm_points(60, run.Plan(False))) == 6
    vectors = run.skewed_counts(60, 50, np.random.default_rng(1))
    assert all(v.sum() >= 1 and v.size <= 64 for v in vectors)
    assert len({int((v > 0).sum()) for v in vectors}) > 5  # from a few hot experts to nearly even


def test_calibrate_without_cuda_is_one_line(tmp_path: Path) -> None:
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    out = _moe_sim("calibrate", "-o", str(tmp_path / "p.yaml"), "--quick", cwd=tmp_path)
    assert out.returncode == 2
    assert out.stderr.startswith("error: calibrate needs a CUDA GPU") and "Traceback" not in out.stderr
    assert len(out.stderr.strip().splitlines()) == 1
    assert not list(tmp_path.iterdir())


def test_cpu_calibration_end_to_end_prices_replay(tmp_path: Path) -> None:
    trace = random_trace(tmp_path / "t.h5", tokens=1200, layers=2, experts=8, top_k=2, hidden=32, ffn=16)
    prof = tmp_path / "cpu-h200.yaml"
    out = _moe_sim("calibrate", "--trace", str(trace), "--device", "cpu", "--hardware", "h200", "--quick",
                   "--quiet", "-o", str(prof), cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    assert "tile" in out.stdout and "skewed count vectors" in out.stdout
    p = profiles.load_profile(prof)
    assert p.hardware == "h200" and p.quick and p.gpu["device"] == "cpu"
    (shape,) = p.shapes
    assert (shape.hidden_size, shape.expert_intermediate_size) == (32, 16)
    assert shape.expert.residuals["vectors"] == run.Plan(True).skewed_vectors
    assert shape.non_expert is not None

    def replay(*extra: str) -> dict:
        res = _moe_sim("replay", str(trace), "--gpus", "2", "--placements", "contiguous", "--json", *extra,
                       cwd=tmp_path)
        assert res.returncode == 0, res.stderr
        return json.loads(res.stdout)["placements"][0]["timings"][0]

    measured = replay("--hardware", str(prof))
    roofline = replay("--hardware", str(prof), "--cost-model", "roofline")
    assert measured["priced_by"]["expert_time"] == "measured profile cpu-h200"
    assert roofline["priced_by"]["expert_time"] == "roofline (uncalibrated)"
    assert measured["step_time"]["mean"] != roofline["step_time"]["mean"]


def test_interrupted_calibration_leaves_no_profile(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import cli

    trace = random_trace(tmp_path / "t.h5", tokens=300, layers=1, experts=4, top_k=2, hidden=16, ffn=8)

    def interrupt(*_args: object, **_kw: object) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(run, "measure_non_expert", interrupt)
    target = tmp_path / "out" / "p.yaml"
    res = CliRunner().invoke(cli.moe_sim, ["calibrate", "--trace", str(trace), "--device", "cpu",
                                           "--hardware", "h200", "--quick", "--quiet", "-o", str(target)])
    assert res.exit_code == 130
    assert not target.exists() and not (target.parent.exists() and list(target.parent.iterdir()))


def test_profile_write_is_atomic(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    trace = random_trace(tmp_path / "t.h5", tokens=300, layers=1, experts=4, top_k=2, hidden=16, ffn=8)
    from traces.reader import open_trace

    with open_trace([trace]) as tr:
        meta = tr.metadata
    p = run.calibrate([("t", meta)], backend="torch-grouped-mm", quick=True, hardware="h200",
                      communication=None, tick=lambda n: None, device="cpu")
    target = tmp_path / "p.yaml"

    def broken(*_a: object) -> None:
        raise OSError("disk full")

    monkeypatch.setattr(profiles.os, "replace", broken)
    with pytest.raises(OSError):
        profiles.write_profile(p, target)
    assert list(tmp_path.glob("*p.yaml*")) == []


def test_a_backend_with_fewer_experts_runs_fewer_groups_on_the_same_weights() -> None:
    shape = ExpertShape("t", 32, 16, "swiglu")
    b = make_backend("torch-grouped-mm", shape, 8, CPU)
    two = b.with_experts(2)
    assert two.num_experts == 2 and b.with_experts(8) is b and b.num_experts == 8
    assert two.w_up.data_ptr() == b.w_up.data_ptr()  # views, no copy
    counts = np.array([3, 4])
    work = assignments_from_counts(counts, 32, CPU, np.random.default_rng(0), top_k=2)
    wide = assignments_from_counts(np.pad(counts, (0, 6)), 32, CPU, np.random.default_rng(0), top_k=2)
    torch.testing.assert_close(two.run(work), b.run(wide))
    assert make_backend("transformers", shape, 8, CPU).with_experts(2).num_experts == 8


def test_whole_and_gemm_times_come_in_adjacent_pairs(monkeypatch: pytest.MonkeyPatch) -> None:
    shape = ExpertShape("t", 32, 16, "swiglu")
    b = make_backend("torch-grouped-mm", shape, 8, CPU)
    seen: list[int] = []

    def fake_time(items, repeats=7, warmup=2):  # type: ignore[no-untyped-def]
        seen.append(len(items))
        return np.arange(len(items), dtype=np.float64)

    timer = CpuTimer(CPU)
    monkeypatch.setattr(timer, "time", fake_time)
    whole, gemms = run._time_whole_and_gemms(b, [np.array([1, 2]), np.array([3, 0, 0, 1])], shape, timer,
                                             run.Plan(True), np.random.default_rng(0))
    assert seen == [4]
    np.testing.assert_array_equal(whole, [0, 2])
    np.testing.assert_array_equal(gemms, [1, 3])


def test_refit_rewrites_a_profile_from_its_measurements_and_refuses_one_without(tmp_path: Path) -> None:
    trace = random_trace(tmp_path / "t.h5", tokens=300, layers=1, experts=4, top_k=2, hidden=16, ffn=8)
    from traces.reader import open_trace

    with open_trace([trace]) as tr:
        meta = tr.metadata
    p = run.calibrate([("t", meta)], backend="torch-grouped-mm", quick=True, hardware="h200",
                      communication=None, tick=lambda n: None, device="cpu")
    src, out = tmp_path / "p.yaml", tmp_path / "refit.yaml"
    profiles.write_profile(p, src)
    res = _moe_sim("calibrate", "--refit", str(src), "-o", str(out), "--json", cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    assert json.loads(res.stdout)["format"] == profiles.PROFILE_FORMAT
    res = _moe_sim("calibrate", "--refit", str(src), "-o", str(tmp_path / "y.yaml"), "--quick", "--model",
                   "olmoe-1b-7b", cwd=tmp_path)
    assert res.returncode == 2 and "takes no --model, --quick" in res.stderr
    assert not (tmp_path / "y.yaml").exists()
    new, old = profiles.load_profile(out), profiles.load_profile(src)
    assert new.created_at == old.created_at and new.gpu == old.gpu
    assert new.shapes[0].expert.tile_rows == old.shapes[0].expert.tile_rows
    np.testing.assert_allclose(new.shapes[0].expert.gemm_seconds, old.shapes[0].expert.gemm_seconds,
                               rtol=1e-4)
    data = profiles.profile_to_dict(old)
    data["shapes"][0]["expert"]["measured_gemm_seconds"] = None
    import yaml

    bare = tmp_path / "bare.yaml"
    bare.write_text(yaml.safe_dump(data))
    res = _moe_sim("calibrate", "--refit", str(bare), "-o", str(tmp_path / "x.yaml"), cwd=tmp_path)
    assert res.returncode == 2 and res.stderr.startswith("error: ") and "cannot re-fit" in res.stderr
    assert len(res.stderr.strip().splitlines()) == 1 and not (tmp_path / "x.yaml").exists()
