"""The reading snippets in docs/trace-format.md and docs/reading-snippet.md run and read the right data."""

from __future__ import annotations

import ast
import importlib.util
import os
import re
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from traces import open_trace
from traces.chunk import TraceChunk
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
    results = sorted(assigned_names(code) & CHECKED)
    assert results, f"{name}: the snippet computes none of {sorted(CHECKED)}, so nothing it reads is checked"
    for result in results:
        check_result(result, namespace[result], expected)


CHECKED = frozenset({"ids", "weights", "counts", "tokens", "tokens_per_phase", "per_phase", "hot",
                     "layer0_load", "meta", "chunk"})


def check_result(name: str, value: Any, expected: TraceChunk) -> None:
    """A snippet's result `name` against the trace it read (3000 tokens, 64 experts)."""
    ids, phase = expected.expert_ids, expected.phase
    assert ids is not None and phase is not None
    layer0 = np.bincount(ids[:, 0].ravel(), minlength=64)
    hottest = (int(np.argmax(layer0)), int(layer0.max()))
    if name == "ids":
        np.testing.assert_array_equal(value, ids)
    elif name == "weights":
        np.testing.assert_array_equal(value, expected.expert_weights)
    elif name == "counts":
        assert value.sum() == ids.size
        np.testing.assert_array_equal(value[0], layer0)
    elif name == "tokens":
        assert value == 3000
    elif name == "tokens_per_phase":
        assert value.sum() == 3000 and value[1] == int((phase == 1).sum())
    elif name == "per_phase":
        assert dict(value) == {0: int((phase == 0).sum()), 1: int((phase == 1).sum())}
    elif name == "hot":
        assert value[0] == hottest
    elif name == "layer0_load":
        assert value.row(0) == hottest
    # the metadata a reading snippet loaded, or the TraceMetadata the writer example built
    elif name == "meta":
        if not isinstance(value, dict):
            value = value.to_dict()
        assert value["num_experts"] == 64 and value["top_k"] == ids.shape[2]
    else:
        assert name == "chunk"
        np.testing.assert_array_equal(value.expert_ids, ids[-value.num_tokens:])


def assigned_names(code: str) -> set[str]:
    """Names a snippet assigns (at any depth), so a check cannot be skipped by a snippet that drops its
    result."""
    return {node.id for node in ast.walk(ast.parse(code)) if isinstance(node, ast.Name)
            and isinstance(node.ctx, ast.Store)}


def test_gzip_read_figure_matches_the_benchmark() -> None:
    """trace-format.md's "N.Nx slower to read" for gzip is the lz4 / gzip read rate of benchmarks.md's
    table."""
    rates = {m.group(1): float(m.group(2)) for m in re.finditer(
        r"^\| hdf5 \| (\w+) \| [\d.]+ \| ([\d.]+) M \|$", (ROOT / "docs" / "benchmarks.md").read_text(),
        re.M)}
    stated = re.search(r"\| `gzip` \|.*?([\d.]+)x slower to read than `lz4`", DOCS[0].read_text())
    assert stated is not None and {"lz4", "gzip"} <= rates.keys()
    assert float(stated.group(1)) == round(rates["lz4"] / rates["gzip"], 1)


def test_readme_reading_snippet(traces_dir: Path) -> None:
    """The README's "Read a trace without moe-trace" block, on a trace.h5 and the trace.arrow it says how to
    make."""
    blocks = [b for b in re.findall(r"```python\n(.*?)```", (ROOT / "README.md").read_text(),
                                    re.S) if "h5py" in b]
    assert len(blocks) == 1
    from traces.convert import convert

    readme_dir = traces_dir / "readme"
    readme_dir.mkdir()
    (readme_dir / "trace.h5").write_bytes((traces_dir / "trace.h5").read_bytes())
    # what `moe-sim convert trace.h5 trace.arrow` does
    convert(readme_dir / "trace.h5", readme_dir / "trace.arrow")
    with open_trace(traces_dir / "trace.h5") as trace:
        expected = trace.read_all(["expert_ids"]).expert_ids
    assert expected is not None
    cwd = os.getcwd()
    os.chdir(readme_dir)
    try:
        namespace: dict = {}
        exec(compile(blocks[0], "README.md", "exec"), namespace)
    finally:
        os.chdir(cwd)
    np.testing.assert_array_equal(namespace["ids"], expected)  # the Arrow read, the block's last
    assert namespace["n"] == 3000 and namespace["meta"]["top_k"] == expected.shape[2]
