"""Recording across torchrun ranks: shards with global sequence ids and distinct steps that moe-sim reads as
one trace, with the same routing, token for token, as one process (CPU, 2 gloo ranks)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from recorder.ranks import RankInfo, rank_from_env, rank_prompts, shard_path
from traces import open_trace

ROOT = Path(__file__).resolve().parent.parent
PROMPTS = ROOT / "examples" / "prompts.txt"
MAIN = "import sys, cli; sys.argv[0] = 'moe-rec'; cli.moe_rec()"


def test_rank_helpers() -> None:
    assert rank_from_env({}) == RankInfo() and not RankInfo().distributed
    assert rank_from_env({"WORLD_SIZE": "1", "RANK": "0"}) == RankInfo()
    info = rank_from_env({"WORLD_SIZE": "4", "RANK": "2", "LOCAL_RANK": "1"})
    assert (info.rank, info.world_size, info.local_rank, info.distributed) == (2, 4, 1, True)
    assert shard_path(Path("out/trace.h5"), 3) == Path("out/trace-rank3.h5")
    assert rank_prompts(10, info) == [2, 6] and rank_prompts(3, RankInfo(0, 4, 0)) == [0]
    assert sorted(sum((rank_prompts(11, RankInfo(r, 3, 0)) for r in range(3)), [])) == list(range(11))


def _by_token(chunk) -> tuple[np.ndarray, ...]:
    order = np.lexsort((chunk.position, chunk.seq_id))
    return chunk.seq_id[order], chunk.position[order], chunk.expert_ids[order], chunk.expert_weights[order]


@pytest.mark.timeout(900)
def test_two_gloo_ranks_record_what_one_process_records(tmp_path: Path) -> None:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    args = ["record", "--prompts", str(PROMPTS), "--max-new-tokens", "3", "--device", "cpu",
            "--batch-size", "4"]
    script = tmp_path / "moe_rec.py"
    script.write_text(MAIN + "\n")
    ranks = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                            "--nproc-per-node", "2", str(script), *args, "-o",
                            str(tmp_path / "t.h5")], cwd=ROOT, env=env,
                           capture_output=True, text=True, timeout=600)
    assert ranks.returncode == 0, ranks.stderr[-3000:]
    assert "all 2 ranks: " in ranks.stdout and "moe-sim info" in ranks.stdout
    single = subprocess.run([sys.executable, "-c", MAIN, *args, "-o", str(tmp_path / "one.h5")], cwd=ROOT,
                            env=env, capture_output=True, text=True, timeout=600)
    assert single.returncode == 0, single.stderr[-3000:]
    shards = [tmp_path / "t-rank0.h5", tmp_path / "t-rank1.h5"]
    assert all(p.exists() for p in shards) and not (tmp_path / "t.h5").exists()

    with open_trace(str(tmp_path / "t-rank*.h5")) as both, open_trace(tmp_path / "one.h5") as one:
        assert both.complete and both.num_tokens == one.num_tokens
        a, b = both.read_all(), one.read_all()
        for x, y in zip(_by_token(a), _by_token(b), strict=True):
            np.testing.assert_array_equal(x, y)  # same tokens, same experts and weights
    with open_trace(shards[0]) as r0, open_trace(shards[1]) as r1:
        c0, c1 = r0.read_all(), r1.read_all()
        assert c0.seq_id is not None and c1.seq_id is not None and c0.step is not None and c1.step is not None
        # global prompt ids
        assert set(np.unique(c0.seq_id) % 2) == {0} and set(np.unique(c1.seq_id) % 2) == {1}
        # passes numbered apart
        assert set(np.unique(c0.step) % 2) == {0} and set(np.unique(c1.step) % 2) == {1}
        assert np.all(np.diff(c0.step) >= 0) and np.all(np.diff(c1.step) >= 0)
        assert (r0.metadata.notes["rank"], r1.metadata.notes["rank"],
                r1.metadata.notes["world_size"]) == (0, 1, 2)
    info = subprocess.run([sys.executable, "-c", "import sys, cli; sys.argv[0] = 'moe-sim'; cli.moe_sim()",
                           "info", "--json",
                           str(tmp_path / "t-rank*.h5")], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=300)
    assert info.returncode == 0, info.stderr
    assert b.seq_id is not None and json.loads(info.stdout)["num_sequences"] == len(np.unique(b.seq_id))
