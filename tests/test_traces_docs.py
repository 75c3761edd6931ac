"""The reading snippets in docs/trace-format.md and docs/reading-snippet.md run and read the right data."""

from __future__ import annotations

import importlib.util
import os
import re
from pathlib import Path

import numpy as np
import pytest

from traces import open_trace
from traces.synthetic import SynthConfig, write_synthetic

ROOT = Path(__file__).resolve().parent.parent
DOCS = [ROOT / "docs" / "trace-format.md", ROOT / "docs" / "reading-snippet.md"]
OPTIONAL = ("pandas", "polars", "duckdb")  # dev extras: a snippet that needs a missing one is skipped


def snippets() -> list[tuple[str, str]]:
    out = []
    for doc in DOCS:
        for i, code in enumerate(re.findall(r"```python\n(.*?)```", doc.read_text(), re.S)):
            out.append((f"{doc.name}:{i}", code))
    return out


@pytest.fixture(scope="module")
def traces_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("docs")
    config = SynthConfig(tokens=3000, seed=5, sequences=4)
    write_synthetic(folder / "trace.h5", config)
    write_synthetic(folder / "trace.arrow", config)
    return folder


@pytest.mark.parametrize(("name", "code"), snippets(), ids=[n for n, _ in snippets()])
def test_snippet(name: str, code: str, traces_dir: Path) -> None:
    for module in OPTIONAL:
        if re.search(rf"^import {module}\b", code, re.M) and importlib.util.find_spec(module) is None:
            pytest.skip(f"{module} is not installed (pip install -e '.[dev]')")
    with open_trace(traces_dir / "trace.h5") as trace:
        expected = trace.read_all()
    cwd = os.getcwd()
    os.chdir(traces_dir)
    try:
        namespace: dict = {}
        exec(compile(code, name, "exec"), namespace)
    finally:
        os.chdir(cwd)
    if "ids" in namespace:
        np.testing.assert_array_equal(namespace["ids"], expected.expert_ids)
    if "weights" in namespace:
        np.testing.assert_array_equal(namespace["weights"], expected.expert_weights)
    if "counts" in namespace:
        assert namespace["counts"].sum() == expected.expert_ids.size  # type: ignore[union-attr]
        np.testing.assert_array_equal(namespace["counts"][0], np.bincount(expected.expert_ids[:, 0].ravel(), minlength=64))  # type: ignore[index]
    if "tokens" in namespace:
        assert namespace["tokens"] == 3000
    if "tokens_per_phase" in namespace:
        assert namespace["tokens_per_phase"].sum() == 3000
        assert namespace["tokens_per_phase"][1] == int((expected.phase == 1).sum())  # type: ignore[union-attr]
    if "per_phase" in namespace:
        assert dict(namespace["per_phase"]) == {0: int((expected.phase == 0).sum()), 1: int((expected.phase == 1).sum())}  # type: ignore[union-attr]
    layer0 = np.bincount(expected.expert_ids[:, 0].ravel(), minlength=64)  # type: ignore[index]
    if "hot" in namespace:
        assert namespace["hot"][0] == (int(np.argmax(layer0)), int(layer0.max()))
    if "layer0_load" in namespace:
        top = namespace["layer0_load"].row(0)
        assert top == (int(np.argmax(layer0)), int(layer0.max()))
