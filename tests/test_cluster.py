"""Replay, plan and rebalance on a Dask cluster (2 worker processes on loopback) give bit-identical results to
the single-process run; bad --cluster values are one-line errors, fast."""

from __future__ import annotations

import json
import logging
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from sim_fixtures import random_trace

import cli
from simulator import kernels as K
from simulator.cluster import open_cluster
from simulator.hardware import GpuSpec
from simulator.plan import PlanConfig, plan
from simulator.rebalance import RebalanceConfig, rebalance_trace
from simulator.replay import ReplayConfig, replay, segment
from traces import open_trace
from traces.errors import InputError

distributed = pytest.importorskip("distributed")
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def address():
    """A scheduler with two single-thread worker processes on loopback, shared by the module's tests."""
    with distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True, host="127.0.0.1",
                                  dashboard_address=None, silence_logs=logging.ERROR) as local:
        yield local.scheduler_address


@pytest.fixture
def trace_path(tmp_path, monkeypatch):
    # many shards of a few chunks each, recorded steps that cross their edges, both phases
    monkeypatch.setattr(segment, "SHARD_TOKENS", 300)
    return random_trace(tmp_path / "t.h5", tokens=4000, layers=3, experts=16, top_k=4, step_len=40)


def _exact(data) -> str:
    return json.dumps(data, sort_keys=True, default=lambda a: np.asarray(a).tolist())


def test_replay_matches_the_single_process_run(address, trace_path):
    config = ReplayConfig(num_gpus=4, gpus_per_node=2, hardware=GpuSpec.from_name("h200"),
                          redundant_experts=4,
                          placements=("contiguous", "balanced", "replicated", "coactivation"),
                          tokens_per_step=64, fit_fraction=0.25, chunk_tokens=100)
    recorded = ReplayConfig(num_gpus=4, gpus_per_node=4, hardware=GpuSpec.from_name("h100"),
                            redundant_experts=4, placements=("balanced", "replicated"), phase="decode",
                            fit_fraction=0.3, chunk_tokens=64)
    for cfg in (config, recorded):
        with open_trace(trace_path) as tr:
            alone = _exact(replay(tr, cfg).to_dict())
        # the workers open the trace by its file:// URL, as they would an s3:// one
        with open_cluster(address) as on, open_trace(f"file://{trace_path}") as tr:
            assert on is not None
            ticks: list[int] = []
            spread = _exact(replay(tr, cfg, progress=ticks.append, cluster=on).to_dict())
        assert spread == alone
        assert sum(ticks) == 4000


@pytest.mark.parametrize("dispatch", ["least-loaded", "lp"])
def test_a_per_step_dispatch_policy_replays_identically_on_the_cluster(address, trace_path, dispatch):
    cfg = ReplayConfig(num_gpus=4, gpus_per_node=2, hardware=GpuSpec.from_name("h200"), redundant_experts=4,
                       placements=("replicated",), tokens_per_step=64, chunk_tokens=100, dispatch=dispatch)
    with open_trace(trace_path) as tr:
        alone = _exact(replay(tr, cfg).to_dict())
    with open_cluster(address) as on, open_trace(trace_path) as tr:
        assert _exact(replay(tr, cfg, cluster=on).to_dict()) == alone


def test_arrow_shards_read_by_range_on_the_workers(address, tmp_path, monkeypatch):
    """An Arrow trace of 500-row record batches cut into 700-token shards: shards start inside batches and
    workers skip the batches before theirs."""
    monkeypatch.setattr(segment, "SHARD_TOKENS", 700)
    path = random_trace(tmp_path / "t.arrow", tokens=4000, layers=2, experts=8, top_k=2, step_len=30,
                        append_rows=500)
    config = ReplayConfig(num_gpus=4, gpus_per_node=4, placements=("balanced", "replicated"),
                          redundant_experts=4, tokens_per_step=50, chunk_tokens=100)
    with open_trace(path) as tr:
        alone = _exact(replay(tr, config).to_dict())
        with open_cluster(address) as on:
            assert _exact(replay(tr, config, cluster=on).to_dict()) == alone


def test_plan_matches_the_single_process_run(address, trace_path):
    gpus = [GpuSpec.from_name("h100"), GpuSpec.from_name("b200")]
    config = PlanConfig(target_tokens_per_s=1e4, hardware=gpus, gpus=[2, 4], gpus_per_node=2,
                        placements=["contiguous", "replicated"],
                        redundant_experts=[0, 4], tokens_per_step=[0, 32], min_full_steps=2, fit_fraction=0.2,
                        chunk_tokens=100)
    with open_trace(trace_path) as tr:
        alone = _exact(plan(tr, config).to_dict())
        with open_cluster(address) as on:
            spread = _exact(plan(tr, config, cluster=on).to_dict())
    assert spread == alone
    assert len(json.loads(alone)["candidates"]) == 24  # 2 GPU counts x 3 placements x 2 batches x 2 GPUs


def test_rebalance_matches_the_single_process_run(address, trace_path):
    config = RebalanceConfig(every=(3, 10, 40), window=8, policy="replicated", num_gpus=4, gpus_per_node=2,
                             redundant_experts=4, tokens_per_step=48)
    with open_trace(trace_path) as tr:
        alone = [r.to_dict(series=True) for r in rebalance_trace(tr, config, chunk_tokens=100)]
        with open_cluster(address) as on:
            results = rebalance_trace(tr, config, chunk_tokens=100, cluster=on)
            spread = [r.to_dict(series=True) for r in results]
    assert _exact(spread) == _exact(alone)
    assert [r["every"] for r in spread] == [3, 10, 40]


def test_cli_runs_on_a_scheduler_address(address, trace_path):
    runner = CliRunner()
    args = ["rebalance", str(trace_path), "--gpus", "4", "--window", "6", "--rebalance-every", "5,20",
            "--json"]
    alone = runner.invoke(cli.moe_sim, args)
    spread = runner.invoke(cli.moe_sim, [*args, "--cluster", address])
    assert alone.exit_code == 0 and spread.exit_code == 0, spread.output
    assert json.loads(spread.stdout) == json.loads(alone.stdout)


def test_a_worker_that_cannot_see_the_trace_says_so(address, trace_path):
    with open_trace(trace_path) as tr, open_cluster(address) as on:
        trace_path.unlink()  # still open here, gone for the workers
        with pytest.raises(InputError, match="on worker tcp://.*no such file.*same path"):
            replay(tr, ReplayConfig(num_gpus=4, placements=("balanced",), chunk_tokens=100), cluster=on)


def test_local_cluster_from_the_command_line(tmp_path):
    """--cluster local:2 starts two worker processes and stops them; the JSON equals the plain run's."""
    path = random_trace(tmp_path / "t.h5", tokens=1500, layers=2, experts=8, top_k=2)
    args = [sys.executable, str(ROOT / "cli.py"), "replay", str(path), "--gpus", "4", "--placements",
            "balanced,replicated", "--json"]
    alone = subprocess.run(args, capture_output=True, text=True, cwd=ROOT, timeout=300)
    spread = subprocess.run([*args, "--cluster", "local:2"], capture_output=True, text=True, cwd=ROOT,
                            timeout=300)
    assert spread.returncode == 0, spread.stderr
    assert json.loads(spread.stdout) == json.loads(alone.stdout)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_an_unreachable_scheduler_is_a_fast_one_line_error(tmp_path):
    path = random_trace(tmp_path / "t.h5", tokens=300, layers=2, experts=8, top_k=2)
    env = dict(os.environ, MOE_TRACE_CONNECT_SECONDS="1")
    start = time.monotonic()
    out = subprocess.run([sys.executable, str(ROOT / "cli.py"), "plan", str(path), "--target-tokens-per-s",
                          "1", "--cluster", f"tcp://127.0.0.1:{_free_port()}"], capture_output=True,
                         text=True, cwd=ROOT, timeout=120, env=env)
    assert out.returncode == 2
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and "cannot reach a Dask scheduler" in lines[0] and "Traceback" not in out.stderr
    assert time.monotonic() - start < 30  # the interpreter's start-up and imports, plus the 1 s timeout


@pytest.mark.parametrize("value, message", [("local:0", "worker count from 1"), ("local:x", "worker count"),
                                            ("my cluster", "expected local:N"),
                                            ("missing.json", "no such scheduler file")])
def test_malformed_cluster_values_are_refused_before_anything_runs(tmp_path, value, message):
    path = random_trace(tmp_path / "t.h5", tokens=300, layers=2, experts=8, top_k=2)
    res = CliRunner().invoke(cli.moe_sim, ["replay", str(path), "--cluster", value])
    assert res.exit_code == 2 and message in res.output and "Traceback" not in res.output


def test_without_dask_cluster_says_how_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "distributed", None)  # import distributed now raises ImportError
    with pytest.raises(InputError, match=r"pip install 'moe-trace\[cluster\]'"), open_cluster("local:2"):
        pass


def test_kernel_thread_setting_is_left_alone(address, trace_path):
    """The driver's --workers setting does not reach the workers and does not change the result."""
    config = ReplayConfig(num_gpus=4, placements=("balanced",), chunk_tokens=100)
    K.set_workers(1)
    try:
        with open_trace(trace_path) as tr, open_cluster(address) as on:
            one = _exact(replay(tr, config, cluster=on).to_dict())
    finally:
        K.set_workers(None)
    with open_trace(trace_path) as tr:
        assert one == _exact(replay(tr, config).to_dict())
