"""Replay on several threads gives bit-identical results to one thread (variants run in parallel, each in serial
order), and a worker count the machine cannot give is refused."""

from __future__ import annotations

import json

import numba
import numpy as np
import pytest
from test_sim_fixtures import random_trace

from simulator import kernels as K
from simulator.hardware import GpuSpec
from simulator.replay import ReplayConfig, replay
from traces import open_trace
from traces.errors import InputError


def _exact(result) -> str:
    return json.dumps(result.to_dict(), sort_keys=True, default=lambda a: np.asarray(a).tolist())


@pytest.mark.skipif(numba.config.NUMBA_NUM_THREADS < 2, reason="needs 2 cores")
def test_two_workers_match_one_bit_for_bit(tmp_path):
    path = random_trace(tmp_path / "t.h5", tokens=4000, layers=3, experts=16, top_k=4)
    config = ReplayConfig(num_gpus=4, gpus_per_node=2, hardware=GpuSpec.from_name("h200"), redundant_experts=4,
                          placements=("contiguous", "round-robin", "balanced", "replicated", "coactivation"),
                          tokens_per_step=64, fit_fraction=0.25)
    out = []
    try:
        for workers in (1, 2):
            assert K.set_workers(workers) == workers
            with open_trace(path) as tr:
                out.append(_exact(replay(tr, config)))
    finally:
        K.set_workers(None)
    assert out[0] == out[1]


def test_impossible_worker_count_is_refused():
    with pytest.raises(InputError, match="--workers must be 1 to"):
        K.set_workers(numba.config.NUMBA_NUM_THREADS + 1)
    with pytest.raises(InputError, match="--workers must be 1 to"):
        K.set_workers(-1)
