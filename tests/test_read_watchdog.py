"""The data-read deadline: a read stuck inside libhdf5 or Arrow ends the process with one line and exit code
2 instead of hanging (traces/watchdog.py). The stuck call is simulated by a library method that sleeps."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from sim_fixtures import tiny_meta, write_ids

ROOT = Path(__file__).resolve().parents[1]


def _trace(tmp_path: Path, suffix: str) -> Path:
    ids = np.tile(np.arange(2), (100, 2, 1))  # [T, L, K]: experts 0 and 1
    return write_ids(tmp_path / f"t{suffix}", tiny_meta(2, 4, 2), ids, np.zeros(100), np.zeros(100))


def _run(script: str, *args: str,
         env: dict[str, str] | None = None) -> tuple[subprocess.CompletedProcess, float]:
    start = time.monotonic()
    out = subprocess.run([sys.executable, "-c", script, *args], capture_output=True, text=True, cwd=ROOT,
                         timeout=120, env={**os.environ, **(env or {})})
    return out, time.monotonic() - start


STUCK_READ = """
import sys, time
sys.path.insert(0, {root!r})
from traces import open_trace
from traces.watchdog import exit_on_stuck_reads
exit_on_stuck_reads(0.5)
trace = open_trace(sys.argv[1])
if sys.argv[1].endswith(".h5"):
    import h5py
    h5py.Dataset.__getitem__ = lambda self, key: time.sleep(60)
else:
    import pyarrow as pa
    pa.ipc.RecordBatchFileReader.get_batch_with_custom_metadata = lambda self, i: time.sleep(60)
list(trace.iter_chunks(["expert_ids"]))
print("read finished")
"""


@pytest.mark.parametrize("suffix", [".h5", ".arrow"])
def test_a_stuck_data_read_ends_in_one_line(tmp_path: Path, suffix: str) -> None:
    path = _trace(tmp_path, suffix)
    out, seconds = _run(STUCK_READ.format(root=str(ROOT)), str(path))
    assert out.returncode == 2 and "read finished" not in out.stdout
    assert out.stderr.strip().splitlines() == [
        f"error: {path}: reading its data did not finish in 0.5 s; the file is corrupt"]
    assert seconds < 30  # the deadline, not the 60 s the read would take


CLI_STUCK = """
import sys, time
sys.path.insert(0, {root!r})
import h5py
read = h5py.Dataset.__getitem__
def stuck(self, key):
    if self.name == "/expert_ids":  # the structure probe at open reads other datasets
        time.sleep(60)
    return read(self, key)
h5py.Dataset.__getitem__ = stuck
import cli
cli.moe_sim(["info", sys.argv[1]])
"""


def test_the_command_line_has_the_deadline_on(tmp_path: Path) -> None:
    path = _trace(tmp_path, ".h5")
    out, seconds = _run(CLI_STUCK.format(root=str(ROOT)), str(path), env={"MOE_TRACE_READ_SECONDS": "0.5"})
    assert out.returncode == 2, out.stderr
    assert out.stderr.strip().splitlines() == [
        f"error: {path}: reading its data did not finish in 0.5 s; the file is corrupt"]
    assert seconds < 30
