"""Compiled kernels are cached in the user's cache directory (XDG_CACHE_HOME), not beside the sources, and a
NUMBA_CACHE_DIR the user set is kept."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SNIPPET = ("import os; from simulator import kernels as K; K.step_key(0, 1, 2, 3); "
           "print(os.environ['NUMBA_CACHE_DIR'])")


def _run(env_extra: dict[str, str]) -> str:
    env = {k: v for k, v in os.environ.items() if k not in ("NUMBA_CACHE_DIR", "XDG_CACHE_HOME")}
    env |= {"PYTHONPATH": str(ROOT)} | env_extra
    out = subprocess.run([sys.executable, "-c", SNIPPET], capture_output=True, text=True, timeout=300,
                         env=env, check=True)
    return out.stdout.strip()


def test_kernels_cache_under_the_user_cache_directory(tmp_path):
    where = _run({"XDG_CACHE_HOME": str(tmp_path)})
    assert where == str(tmp_path / "moe-trace" / "numba")
    assert list((tmp_path / "moe-trace" / "numba").rglob("*.nbi")), "no kernel was cached there"


def test_a_user_numba_cache_dir_wins(tmp_path):
    assert _run({"XDG_CACHE_HOME": str(tmp_path / "x"), "NUMBA_CACHE_DIR": str(tmp_path / "mine")}) == \
        str(tmp_path / "mine")
