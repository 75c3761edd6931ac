"""`moe-sim info | validate | convert | synth` through a subprocess, and every bad input: one line, exit 2."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import pytest
from trace_fixtures import make_chunk, make_meta

from traces import open_trace, write_trace

ROOT = Path(__file__).resolve().parent.parent


def moe_sim(*args: str | Path, cwd: Path = ROOT) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "cli.py"), *map(str, args)], capture_output=True,
                          text=True, cwd=cwd, timeout=300)


def assert_one_line_error(result: subprocess.CompletedProcess, *fragments: str) -> None:
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert "Traceback" not in result.stderr
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


@pytest.fixture(scope="module")
def synth_h5(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("synth") / "s.h5"
    result = moe_sim("synth", "-o", out, "--tokens", "20000", "--seed", "3", "--sequences", "12")
    assert result.returncode == 0, result.stderr
    assert "wrote" in result.stdout and "20,000 tokens" in result.stdout
    return out


def test_synth_is_deterministic_and_info_reports_it(synth_h5: Path, tmp_path: Path) -> None:
    again = tmp_path / "again.arrow"
    assert moe_sim("synth", "-o", again, "--tokens", "20000", "--seed", "3",
                   "--sequences", "12").returncode == 0
    with open_trace(synth_h5) as a, open_trace(again) as b:
        first, second = a.read_all(), b.read_all()
        for name, value in first.present().items():
            np.testing.assert_array_equal(getattr(second, name), value, err_msg=name)
    result = moe_sim("info", "--json", synth_h5)
    assert result.returncode == 0, result.stderr
    info = json.loads(result.stdout)
    assert info["num_tokens"] == 20000 and info["num_sequences"] == 12
    assert info["prefill_tokens"] + info["decode_tokens"] == 20000
    assert abs(info["decode_tokens"] / 20000 - 0.25) < 0.01
    assert (info["num_layers"], info["num_experts"], info["top_k"]) == (16, 64, 8)
    assert info["size_bytes"] == synth_h5.stat().st_size
    assert len(info["layers"]) == 16
    counts = np.zeros(64)
    assert first.expert_ids is not None
    for row in first.expert_ids[:, 0].astype(int):
        counts[row] += 1
    share = counts / counts.sum()
    assert info["layers"][0]["top_share"] == pytest.approx(share.max())
    assert info["layers"][0]["entropy"] == pytest.approx(-(share * np.log(share)).sum() / np.log(64))
    assert info["layers"][0]["assignments"] == 20000 * 8 and info["layers"][0]["idle"] == int((counts
                                                                                               == 0).sum())
    assert info["layers"][0]["max_over_mean"] == pytest.approx(share.max() * 64)
    table = moe_sim("info", synth_h5)
    assert table.returncode == 0 and "Per-layer expert load" in table.stdout and "bytes/token" in table.stdout


def test_validate_and_convert_round_trip(synth_h5: Path, tmp_path: Path) -> None:
    ok = moe_sim("validate", synth_h5)
    assert ok.returncode == 0 and ok.stdout.startswith("ok: 20,000 tokens"), ok.stderr
    arrow = tmp_path / "s.arrow"
    assert moe_sim("convert", synth_h5, arrow).returncode == 0
    back = tmp_path / "back.h5"
    assert moe_sim("convert", arrow, back, "--compression", "gzip").returncode == 0
    assert moe_sim("validate", arrow).returncode == 0
    with open_trace(synth_h5) as a, open_trace(back) as b:
        assert a.metadata.to_dict() == b.metadata.to_dict()
        first, second = a.read_all(), b.read_all()
        for name, value in first.present().items():
            np.testing.assert_array_equal(getattr(second, name), value, err_msg=name)
    assert_one_line_error(moe_sim("convert", synth_h5, arrow), "already exists", "--force")
    assert moe_sim("convert", synth_h5, arrow, "--force").returncode == 0


def test_help_everywhere() -> None:
    for command in ("info", "validate", "convert", "synth"):
        result = moe_sim(command, "--help")
        assert result.returncode == 0 and "Usage:" in result.stdout


# ---------------------------------------------------------------- bad input
def _valid(tmp_path: Path, name: str = "t.h5", **meta_overrides: Any) -> Path:
    meta = make_meta(**meta_overrides)
    return write_trace(tmp_path / name, meta, make_chunk(meta, 300))


def test_missing_file(tmp_path: Path) -> None:
    for command in ("info", "validate"):
        assert_one_line_error(moe_sim(command, tmp_path / "nope.h5"), "nope.h5", "no such file")
    assert_one_line_error(moe_sim("convert", tmp_path / "nope.h5", tmp_path / "x.arrow"), "no such file")


def test_not_a_trace(tmp_path: Path) -> None:
    text = tmp_path / "notes.h5"
    text.write_text("hello\n")
    assert_one_line_error(moe_sim("info", text), "notes.h5", "not a trace")
    with h5py.File(tmp_path / "other.h5", "w") as f:
        f["x"] = [1]
    assert_one_line_error(moe_sim("validate", tmp_path / "other.h5"), "not a moe-trace trace")


def test_unknown_schema_version(tmp_path: Path) -> None:
    path = _valid(tmp_path)
    with h5py.File(path, "r+") as f:
        data = json.loads(f.attrs["metadata"])
        data["schema_version"] = 7
        f.attrs["metadata"] = json.dumps(data)
    assert_one_line_error(moe_sim("info", path), "t.h5", "unknown trace schema version 7")


def test_truncated_and_corrupt_files(tmp_path: Path) -> None:
    h5 = _valid(tmp_path)
    data = h5.read_bytes()
    h5.write_bytes(data[: len(data) // 2])
    assert_one_line_error(moe_sim("validate", h5), "t.h5", "truncated or corrupt")
    # An Arrow file cut short loses its footer: its whole batches read back, and it is reported as partial.
    arrow = _valid(tmp_path, "t.arrow")
    data = arrow.read_bytes()
    arrow.write_bytes(data[: len(data) - 100])
    assert_one_line_error(moe_sim("validate", arrow), "t.arrow", "partial")
    # Garbage in the middle of a stored HDF5 chunk.
    bad = _valid(tmp_path, "c.h5")
    with h5py.File(bad, "r+") as f:
        f["expert_ids"].id.write_direct_chunk((0, 0, 0), b"\x00garbage" * 8)
    assert_one_line_error(moe_sim("validate", bad), "c.h5", "cannot read expert_ids")
    assert_one_line_error(moe_sim("info", bad), "c.h5", "cannot read expert_ids")


def test_shards_that_disagree(tmp_path: Path) -> None:
    _valid(tmp_path, "s0.h5")
    _valid(tmp_path, "s1.h5", hidden_size=1)
    assert_one_line_error(moe_sim("info", str(tmp_path / "s*.h5")), "s1.h5", "disagrees", "hidden_size")
    assert_one_line_error(moe_sim("validate", tmp_path / "s0.h5", tmp_path / "s1.h5"), "disagrees")


@pytest.mark.parametrize(
    ("column", "value", "message"),
    [
        ("expert_ids", 200, "expert id 200 is out of range"),
        ("expert_ids", "dup", "appears twice"),
        ("expert_weights", np.nan, "expert_weights holds nan"),
        ("phase", 5, "neither prefill nor decode"),
        ("token_id", 10**6, "token id 1000000 is out of range"),
    ],
)
def test_bad_rows_fail_validate(tmp_path: Path, column: str, value: object, message: str) -> None:
    meta = make_meta()
    chunk = make_chunk(meta, 300)
    target = getattr(chunk, column)
    if value == "dup":
        target[123, 1, 1] = target[123, 1, 0]
    else:
        target[123, ...] = value
    path = write_trace(tmp_path / "bad.arrow", meta, chunk)
    assert_one_line_error(moe_sim("validate", path), "bad.arrow", "row 123", message)


def test_incomplete_metadata_fails_validate(tmp_path: Path) -> None:
    path = _valid(tmp_path, source="recorded")  # a recorded trace must name its transformers/torch versions
    assert_one_line_error(moe_sim("validate", path), "incomplete metadata", "transformers_version")


def test_unsupported_extension_and_existing_output(tmp_path: Path) -> None:
    src = _valid(tmp_path)
    assert_one_line_error(moe_sim("convert", src, tmp_path / "out.csv"), "out.csv",
                          "unsupported trace extension")
    assert_one_line_error(moe_sim("synth", "-o", tmp_path / "out.parquet", "--tokens", "10"), "unsupported")
    before = src.read_bytes()
    assert_one_line_error(moe_sim("synth", "-o", src, "--tokens", "10"), "already exists", "--force")
    assert src.read_bytes() == before
    assert_one_line_error(moe_sim("synth", "-o", tmp_path / "x.h5", "--tokens", "10", "--model", "gpt-9"),
                          "unknown model preset")
    assert_one_line_error(moe_sim("synth", "-o", tmp_path / "x.h5", "--compression", "zstd", "--tokens", "10",
                                  "--counts-file", src), "not a JSON counts file")


def test_debug_shows_the_traceback(tmp_path: Path) -> None:
    result = moe_sim("--debug", "info", tmp_path / "nope.h5")
    assert result.returncode != 0 and "Traceback" in result.stderr
    after = moe_sim("info", tmp_path / "nope.h5", "--debug")  # also after the subcommand
    assert after.returncode != 0 and "Traceback" in after.stderr
    assert_one_line_error(moe_sim("info", tmp_path / "nope.h5"), "nope.h5")
