"""The README's two entry commands are the product's front door: run the first verbatim, check CI runs the
second."""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def readme_commands(block_index: int = 0) -> list[str]:
    blocks = re.findall(r"```bash\n(.*?)```", (ROOT / "README.md").read_text(), re.S)
    assert len(blocks) > block_index, "README lacks that bash block"
    return [line for line in blocks[block_index].splitlines() if line.strip() and not line.startswith("#")]


def test_readme_starts_with_two_commands() -> None:
    commands = readme_commands()
    assert len(commands) == 2
    assert all(c.startswith("./scripts/setup.sh") for c in commands)


def test_ci_runs_the_readme_test_command() -> None:
    ci = (ROOT / ".ci" / "run").read_text()
    assert readme_commands()[1] in ci


def test_readme_main_command_runs_end_to_end() -> None:
    main = readme_commands()[0]
    result = subprocess.run(["bash", "-c", main], cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    trace = ROOT / "demo" / "trace.h5"
    assert trace.exists()
    from traces import open_trace

    with open_trace(trace) as t:
        assert t.complete
        assert t.num_tokens > 0
        phase = t.read_all(["phase"]).phase
        assert phase is not None
        phases = set(phase.tolist())
    assert phases == {0, 1}  # prefill and decode both recorded
    assert "contiguous" in result.stdout  # the replay table compares placements


@pytest.mark.slow
def test_readme_tour_runs() -> None:
    """Every line of the README's tour, verbatim, so the documented commands cannot rot."""
    tour = readme_commands(1)
    assert tour[0].startswith(". .venv/bin/activate")
    script = "set -e\n" + "\n".join(tour)
    result = subprocess.run(["bash", "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=1800,
                            env={**os.environ, "COLUMNS": "120"})
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert (ROOT / "demo" / "report.html").read_bytes().startswith(b"<!DOCTYPE html>")
    for word in ("Per-layer expert load", "contiguous", "Frontier", "refit every"):
        assert word in result.stdout, word
