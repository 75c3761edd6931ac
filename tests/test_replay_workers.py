"""Replay on several threads gives bit-identical results to one thread (shards of the trace replayed at once
and absorbed in order), and a worker count the machine cannot give is refused."""

from __future__ import annotations

import json

import numpy as np
import pytest
from sim_fixtures import random_trace

from simulator import kernels as K
from simulator.hardware import GpuSpec
from simulator.replay import ReplayConfig, replay, segment
from traces import open_trace
from traces.errors import InputError


def _exact(result) -> str:
    return json.dumps(result.to_dict(), sort_keys=True, default=lambda a: np.asarray(a).tolist())


@pytest.mark.skipif(K.available_cores() < 2, reason="needs 2 cores")
@pytest.mark.parametrize("dispatch", ["static", "lp"])
def test_two_workers_match_one_bit_for_bit(tmp_path, monkeypatch, dispatch):
    monkeypatch.setattr(segment, "SHARD_TOKENS", 300)  # many shards, and steps that cross their edges
    path = random_trace(tmp_path / "t.h5", tokens=4000, layers=3, experts=16, top_k=4)
    config = ReplayConfig(num_gpus=4, gpus_per_node=2, hardware=GpuSpec.from_name("h200"),
                          redundant_experts=4,
                          placements=("contiguous", "round-robin", "balanced", "replicated", "coactivation"),
                          tokens_per_step=64, fit_fraction=0.25, chunk_tokens=100, dispatch=dispatch)
    out = []
    try:
        for workers in (1, 2):
            assert K.set_workers(workers) == workers
            with open_trace(path) as tr:
                out.append(_exact(replay(tr, config)))
    finally:
        K.set_workers(None)
    assert out[0] == out[1]


def test_sharded_replay_matches_one_shard(tmp_path, monkeypatch):
    """Shards absorbed in order give the single pass's integer totals and steps exactly, its seconds to
    rounding."""
    path = random_trace(tmp_path / "t.h5", tokens=3000, layers=2, experts=8, top_k=2)
    config = ReplayConfig(num_gpus=4, gpus_per_node=4, hardware=GpuSpec.from_name("h100"),
                          redundant_experts=4, placements=("balanced", "replicated"), tokens_per_step=50,
                          fit_fraction=0.2,
                          chunk_tokens=64)
    runs = []
    for shard in (1 << 20, 128):
        monkeypatch.setattr(segment, "SHARD_TOKENS", shard)
        with open_trace(path) as tr:
            runs.append(replay(tr, config).to_dict())
    one, many = runs
    for a, b in zip(one["placements"], many["placements"], strict=True):
        for key, value in a.items():
            if isinstance(value, float):
                assert b[key] == pytest.approx(value, rel=1e-12), key
            elif isinstance(value, (int, str)):
                assert b[key] == value, key


def test_impossible_worker_count_is_refused():
    with pytest.raises(InputError, match="--workers must be 1 to"):
        K.set_workers(K.available_cores() + 1)
    with pytest.raises(InputError, match="--workers must be 1 to"):
        K.set_workers(-1)
