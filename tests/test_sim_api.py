"""The simulator's public Python API (simulator/__init__.py), run as the README's Python section shows it."""

from __future__ import annotations

import contextlib
import io
import os
import re
from pathlib import Path

import pytest
from sim_fixtures import random_trace

import simulator

ROOT = Path(__file__).resolve().parents[1]


def test_readme_python_section_runs(tmp_path):
    blocks = re.findall(r"```python\n(.*?)```", (ROOT / "README.md").read_text(), re.S)
    (code,) = [b for b in blocks if "import simulator" in b]
    (tmp_path / "demo").mkdir()
    random_trace(tmp_path / "demo" / "trace.h5", tokens=3000, experts=16)
    out = io.StringIO()
    cwd = os.getcwd()
    try:
        os.chdir(tmp_path)
        with contextlib.redirect_stdout(out):
            exec(compile(code, "README.md", "exec"), {})
    finally:
        os.chdir(cwd)
    text = out.getvalue()
    assert text.startswith("Steps: the recorded forward passes;") and "Fastest:" in text
    assert "keep the fixed placement" in text or "refit every" in text


def test_api_names_resolve_and_unknown_names_fail():
    for name in simulator.__all__:
        assert getattr(simulator, name) is not None, name
    assert simulator.replay_trace.__module__ == "simulator.replay"
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        simulator.nope  # noqa: B018
