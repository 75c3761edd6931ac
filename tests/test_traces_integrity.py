"""Trace format 1.1 integrity: block checksums in both encodings, files written before them, a file that hangs
libhdf5, and seeded mutants of each encoding: a clean read, a partial read or one error line, never a silent
change, a traceback, a crash or a hang."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import h5py
import numpy as np
import pyarrow as pa
import pytest
from test_traces_cli import assert_one_line_error, moe_sim
from trace_fixtures import assert_same, make_chunk, make_meta

from traces import open_trace, open_writer, write_trace
from traces.arrow_format import BLOCK_KEY
from traces.checksum import block_checksums, checksum, checksum_numpy
from traces.errors import InputError
from traces.fuzz import BAD_OUTCOMES, fuzz_traces
from traces.schema import FORMAT_MINOR
from traces.validate import validate

DATA = Path(__file__).resolve().parent / "data"
CASES_PER_ENCODING = 200


def test_checksum_kernel_matches_numpy_reference() -> None:
    rng = np.random.default_rng(0)
    for size in (0, 1, 7, 8, 9, 31, 32, 33, 1000, 4099):
        values = rng.integers(0, 256, size, dtype=np.uint8)
        assert checksum(values) == checksum_numpy(values), size
    weights = rng.random((300, 4, 2)).astype(np.float16)
    assert checksum(weights) == checksum_numpy(weights)
    assert checksum(weights)[0] == weights.nbytes
    # the reader's batched form: every block in one kernel call, the same sums as block by block
    for rows, block in ((300, 64), (256, 64), (10, 64), (0, 64), (301, 7)):
        part = weights[:rows]
        want = [checksum_numpy(part[r:r + block]) for r in range(0, rows, block)]
        assert block_checksums(part, block) == want, (rows, block)
    odd = rng.integers(0, 256, 23, dtype=np.uint8)  # 5-byte blocks are not whole words: block by block
    assert block_checksums(odd, 5) == [checksum_numpy(odd[r:r + 5]) for r in range(0, 23, 5)]


def test_checksum_sees_moved_and_changed_bytes() -> None:
    base = np.arange(4096, dtype=np.uint8)
    want = checksum(base)
    for a, b in ((7, 15), (7, 4095), (0, 1), (100, 2100)):  # high bytes of two words, neighbours, far apart
        swapped = base.copy()
        swapped[[a, b]] = swapped[[b, a]]
        assert checksum(swapped) != want, (a, b)
    flipped = base.copy()
    flipped[1234] ^= 0x80
    assert checksum(flipped) != want
    assert checksum(base[:-1]) != want and checksum(np.append(base, 0)) != want


@pytest.mark.parametrize("suffix", [".h5", ".arrow"])
def test_checked_round_trip_over_several_blocks(tmp_path: Path, suffix: str) -> None:
    meta = make_meta()
    chunk = make_chunk(meta, 20_000)
    with open_writer(tmp_path / f"t{suffix}", meta) as writer:
        cuts = [0, 100, 8192, 8200, 17000, 20_000]  # appends that start and end inside checksum blocks
        for start, stop in zip(cuts[:-1], cuts[1:], strict=True):
            writer.append(chunk.slice(start, stop))
    with open_trace(tmp_path / f"t{suffix}") as trace:
        assert trace.shards[0].checked and trace.metadata.format_minor == FORMAT_MINOR
        assert_same(trace.read_all(), chunk)
        parts = list(trace.iter_chunks(["expert_ids", "step"], 3000))
        np.testing.assert_array_equal(np.concatenate([p.expert_ids for p in parts]), chunk.expert_ids)
    assert validate(tmp_path / f"t{suffix}").unchecked == []
    result = moe_sim("validate", tmp_path / f"t{suffix}")
    assert result.returncode == 0 and "every block's checksum verified" in result.stdout, result.stderr


def test_hdf5_resume_keeps_checksums(tmp_path: Path) -> None:
    meta = make_meta()
    chunk = make_chunk(meta, 12_000)
    path = tmp_path / "t.h5"
    with pytest.raises(RuntimeError), open_writer(path, meta) as writer:
        writer.append(chunk.slice(0, 5000))
        raise RuntimeError("writer dies")
    with open_writer(path, make_meta(), resume=True) as writer:
        writer.append(chunk.slice(5000, 12_000))
    assert validate(path).unchecked == []
    with open_trace(path) as trace:
        assert_same(trace.read_all(), chunk)


@pytest.mark.parametrize("suffix", [".h5", ".arrow"])
def test_traces_written_before_checksums_read_as_unchecked(tmp_path: Path, suffix: str) -> None:
    """Files of format 1.0, written by the release before block checksums (kept in tests/data/legacy)."""
    path = DATA / "legacy" / f"format-1.0{suffix}"
    meta = make_meta()
    with open_trace(path) as trace:
        assert not trace.shards[0].checked and trace.metadata.format_minor == 0
        assert_same(trace.read_all(), make_chunk(meta, 300, seed=5))
    assert validate(path).unchecked == [str(path)]
    result = moe_sim("validate", path)
    assert result.returncode == 0 and "unchecked" in result.stdout, result.stderr
    copy = tmp_path / f"copy{suffix}"  # converting it gives a checked file
    assert moe_sim("convert", path, copy).returncode == 0
    assert validate(copy).unchecked == []


def test_hdf5_content_and_header_changes_are_caught(tmp_path: Path) -> None:
    meta = make_meta()
    path = write_trace(tmp_path / "t.h5", meta, make_chunk(meta, 10_000))
    shutil.copy(path, tmp_path / "m.h5")
    # valid compressed data, other values: only a checksum sees it
    with h5py.File(tmp_path / "t.h5", "r+") as f:
        ids = f["expert_ids"][9000]
        f["expert_ids"][9000] = ids[:, ::-1]
    with pytest.raises(InputError,
                       match=r"t\.h5: checksum mismatch in expert_ids block 1 \(rows 8192..10000\)"):
        open_trace(tmp_path / "t.h5").read_all()
    assert_one_line_error(moe_sim("validate", tmp_path / "t.h5"), "t.h5", "checksum mismatch", "block 1")
    with h5py.File(tmp_path / "m.h5", "r+") as f:
        data = json.loads(f.attrs["metadata"])
        data["hidden_size"] += 1
        f.attrs["metadata"] = json.dumps(data)
    assert_one_line_error(moe_sim("info", tmp_path / "m.h5"), "m.h5",
                          "checksum mismatch in the root attributes")


def _rewrite_arrow(src: Path, dst: Path, edit) -> None:
    """Copy an Arrow trace batch by batch (with each batch's custom metadata), letting edit change the
    batches."""
    with pa.OSFile(str(src), "r") as source:
        reader = pa.ipc.open_file(source)
        got = [reader.get_batch_with_custom_metadata(i) for i in range(reader.num_record_batches)]
        batches = edit([(g.batch, g.custom_metadata) for g in got])
        with pa.OSFile(str(dst), "wb") as sink, pa.ipc.new_file(sink, reader.schema) as writer:
            for batch, custom in batches:
                writer.write_batch(batch, custom_metadata=custom)


def test_arrow_content_and_order_changes_are_caught(tmp_path: Path) -> None:
    meta = make_meta()
    chunk = make_chunk(meta, 3000)
    with open_writer(tmp_path / "t.arrow", meta) as writer:
        for start in range(0, 3000, 1000):
            writer.append(chunk.slice(start, start + 1000))

    def change_weights(batches):
        batch, custom = batches[1]
        column = batch.schema.get_field_index("expert_weights")
        other = batches[2][0].column(column)  # same type and length, other values
        return [batches[0], (batch.set_column(column, batch.schema.field(column), other), custom),
                *batches[2:]]

    _rewrite_arrow(tmp_path / "t.arrow", tmp_path / "w.arrow", change_weights)
    assert_one_line_error(moe_sim("validate", tmp_path / "w.arrow"), "w.arrow",
                          "record batch 1 (rows 1000..2000)", "checksum mismatch in expert_weights")
    _rewrite_arrow(tmp_path / "t.arrow", tmp_path / "o.arrow", lambda b: [b[1], b[0], *b[2:]])
    with pytest.raises(InputError, match="record batch 0 .* holds the rows of batch 1"):
        open_trace(tmp_path / "o.arrow").read_all(["step"])

    def drop_block_record(batches):
        batch, custom = batches[0]
        return [(batch, {k: v for k, v in custom.items() if k != BLOCK_KEY}), *batches[1:]]

    _rewrite_arrow(tmp_path / "t.arrow", tmp_path / "d.arrow", drop_block_record)
    assert_one_line_error(moe_sim("validate", tmp_path / "d.arrow"), "checksum record is missing")


def test_file_that_hangs_libhdf5_is_a_one_line_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """tests/data/fuzz/hang-attr.h5: a 512-byte range duplicated inside a valid trace makes libhdf5 spin for
    minutes on an attribute; the structure probe gives up after MOE_TRACE_PROBE_SECONDS."""
    monkeypatch.setenv("MOE_TRACE_PROBE_SECONDS", "2")
    assert_one_line_error(moe_sim("validate", DATA / "fuzz" / "hang-attr.h5"), "hang-attr.h5",
                          "did not finish")


@pytest.mark.timeout(300)
@pytest.mark.parametrize("encoding", ["hdf5", "arrow"])
def test_mutated_traces_never_read_as_valid(tmp_path: Path, encoding: str) -> None:
    result = fuzz_traces(encoding, CASES_PER_ENCODING, seed=20261202, folder=tmp_path, keep_errors=3)
    assert sum(result.counts.values()) == CASES_PER_ENCODING
    assert not result.bad, result.bad[:5]
    assert all(result.counts[o] == 0 for o in BAD_OUTCOMES)
    assert result.counts["error"] > CASES_PER_ENCODING // 2  # the mutants did damage the files
    for path in result.errors:  # a sample through the CLI: exit 2, one line
        assert_one_line_error(moe_sim("validate", path), Path(path).name)


def test_relative_paths_after_a_change_of_directory(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The structure probe's helper process keeps its own working directory: relative paths still mean the
    caller's."""
    meta = make_meta()
    for folder, rows in (("a", 100), ("b", 200)):
        (tmp_path / folder).mkdir()
        write_trace(tmp_path / folder / "t.h5", meta, make_chunk(meta, rows, seed=rows))
    for folder, rows in (("a", 100), ("b", 200)):
        monkeypatch.chdir(tmp_path / folder)
        with open_trace("t.h5") as trace:
            assert_same(trace.read_all(), make_chunk(meta, rows, seed=rows))
