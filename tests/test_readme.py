"""The README's two entry commands are the product's front door: run the first verbatim, check CI runs the second."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def readme_commands() -> list[str]:
    text = (ROOT / "README.md").read_text()
    block = re.search(r"```bash\n(.*?)```", text, re.S)
    assert block, "README has no bash block"
    return [line for line in block.group(1).splitlines() if line.strip() and not line.startswith("#")]


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
        phases = set(t.read_all(["phase"]).phase.tolist())
    assert phases == {0, 1}  # prefill and decode both recorded
    assert "contiguous" in result.stdout  # the replay table compares placements
