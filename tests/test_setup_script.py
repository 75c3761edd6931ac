"""scripts/setup.sh talks: a line per step, the system packages named before apt-get runs, --no-browser skips
them.

Run against stubs: a copy of the script in a scratch repository whose .venv holds the real Python, with pip,
apt-get and id replaced by scripts that log their arguments, and a PATH holding nothing else (so no real
chromium is found).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

BASH = shutil.which("bash") or "bash"
pytestmark = pytest.mark.skipif(shutil.which("bash") is None or sys.platform == "win32", reason="needs bash")


def _stub(path: Path, body: str) -> None:
    path.write_text("#!/bin/bash\n" + body)
    path.chmod(0o755)


def run_setup(tmp_path: Path, *args: str, uid: int = 0) -> tuple[subprocess.CompletedProcess, str]:
    repo, bin_dir = tmp_path / "repo", tmp_path / "bin"
    (repo / "scripts").mkdir(parents=True)
    shutil.copy(ROOT / "scripts" / "setup.sh", repo / "scripts" / "setup.sh")
    venv_bin = repo / ".venv" / "bin"
    venv_bin.mkdir(parents=True)
    _stub(venv_bin / "python", f'exec "{sys.executable}" "$@"\n')  # this test's Python, with its torch
    (venv_bin / "activate").write_text(f'PATH="{bin_dir}:$PATH"\n')
    bin_dir.mkdir()
    log = tmp_path / "calls.log"
    _stub(bin_dir / "python", f'exec "{sys.executable}" "$@"\n')
    for tool in ("dirname", "timeout", "cat"):
        found = shutil.which(tool)
        assert found is not None
        (bin_dir / tool).symlink_to(found)
    _stub(bin_dir / "pip", f'echo "pip $*" >> "{log}"\n')
    _stub(bin_dir / "apt-get", f'echo "apt-get $*" >> "{log}"\n')
    _stub(bin_dir / "id", f"echo {uid}\n")
    env = {"PATH": str(bin_dir), "HOME": str(tmp_path)}
    out = subprocess.run([BASH, str(repo / "scripts" / "setup.sh"), *args], capture_output=True, text=True,
                         env=env, timeout=300)
    return out, log.read_text() if log.exists() else ""


def test_steps_are_announced_and_chromium_named_before_apt_get(tmp_path: Path) -> None:
    out, calls = run_setup(tmp_path)
    assert out.returncode == 0, out.stderr
    steps = [line for line in out.stdout.splitlines() if line.startswith("==> ")]
    assert steps[0] == "==> using the existing .venv" and steps[1].startswith("==> keeping the installed "
                                                                              "torch")
    assert any("pip install -e '.[dev,cluster]'" in s for s in steps)
    assert "installing system packages chromium and chromium-driver with apt-get" in steps[-1]
    assert "--no-browser skips this" in steps[-1]
    assert "pip install -e .[dev,cluster]" in calls.splitlines()
    assert "pip install -q" not in calls  # pip's own progress is shown
    assert "apt-get install -y -q chromium chromium-driver" in calls
    assert out.stdout.splitlines()[-1].startswith("moe-trace installed in .venv (torch ")


def test_no_browser_skips_the_system_packages(tmp_path: Path) -> None:
    out, calls = run_setup(tmp_path, "--no-browser")
    assert out.returncode == 0, out.stderr
    assert "==> skipping chromium (--no-browser)" in out.stdout and "apt-get" not in calls


def test_not_root_installs_nothing_and_says_so(tmp_path: Path) -> None:
    out, calls = run_setup(tmp_path, uid=1000)
    assert out.returncode == 0 and "apt-get" not in calls
    assert "not installing chromium (needs root and apt-get)" in out.stdout


def test_options(tmp_path: Path) -> None:
    out = subprocess.run([BASH, str(ROOT / "scripts" / "setup.sh"), "--help"], capture_output=True, text=True,
                         env={**os.environ}, timeout=60)
    assert out.returncode == 0 and "--no-browser" in out.stdout
    bad, _ = run_setup(tmp_path, "--bogus")
    assert bad.returncode == 2 and bad.stderr.startswith("error: unknown option --bogus")
