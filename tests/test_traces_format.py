"""Trace format v1: round trips in both encodings, conversion, bounded streaming, shards, crash safety."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import textwrap
import tracemalloc
from pathlib import Path

import h5py
import numpy as np
import pyarrow as pa
import pyarrow.feather as feather
import pytest
from trace_fixtures import assert_same, make_chunk, make_meta

from traces import InputError, TraceChunk, TraceMetadata, open_trace, open_writer, partial_path, write_trace
from traces.arrow_format import batch_rows
from traces.convert import convert

ROOT = Path(__file__).resolve().parent.parent
ENCODINGS = [".h5", ".arrow"]


# ---------------------------------------------------------------- round trips
@pytest.mark.parametrize("suffix", ENCODINGS)
@pytest.mark.parametrize(
    "variant",
    [
        {},
        {"has_logits": True},
        {"weights_dtype": "float32", "has_token_ids": False},
        {"has_weights": False},
    ],
    ids=["default", "logits", "f32-no-token-ids", "ids-only"],
)
def test_round_trip(tmp_path: Path, suffix: str, variant: dict) -> None:
    meta = make_meta(**variant)
    chunk = make_chunk(meta, 700, seed=1)
    path = write_trace(tmp_path / f"t{suffix}", meta, chunk)
    assert not partial_path(path).exists()
    with open_trace(path) as trace:
        assert trace.complete and trace.num_tokens == 700
        assert trace.metadata.contract() == meta.contract()
        assert_same(chunk, trace.read_all())
        if not meta.has_token_ids:
            with pytest.raises(InputError, match="does not store token_id"):
                trace.read_all(["token_id"])


@pytest.mark.parametrize("suffix", ENCODINGS)
def test_uint16_ids_when_more_than_256_experts(tmp_path: Path, suffix: str) -> None:
    meta = make_meta("deepseek-v3", num_experts=300, moe_layers=[3, 4], moe_module_names=["a", "b"])
    chunk = make_chunk(meta, 50)
    assert (chunk.expert_ids is not None and chunk.expert_ids.dtype == np.uint16
            and chunk.expert_ids.max() > 255)
    with open_trace(write_trace(tmp_path / f"t{suffix}", meta, chunk)) as trace:
        assert_same(chunk, trace.read_all())


@pytest.mark.parametrize(("src", "dst"), [(".h5", ".arrow"), (".arrow", ".h5"), (".h5", ".h5")])
def test_conversion_is_lossless(tmp_path: Path, src: str, dst: str) -> None:
    meta = make_meta(has_logits=True, command_line="moe-rec record x", notes={"k": [1, 2]})
    chunk = make_chunk(meta, 1500, seed=2)
    first = write_trace(tmp_path / f"a{src}", meta, chunk)
    out = convert(first, tmp_path / f"b{dst}", chunk_tokens=400)
    back = convert(out, tmp_path / f"c{src}")
    for path in (out, back):
        with open_trace(path) as trace:
            assert trace.complete
            assert trace.metadata.to_dict() == open_trace(first).metadata.to_dict()
            assert_same(chunk, trace.read_all())


def test_convert_refuses_to_overwrite_and_leaves_nothing_on_failure(tmp_path: Path) -> None:
    meta = make_meta()
    src = write_trace(tmp_path / "a.h5", meta, make_chunk(meta, 100))
    (tmp_path / "b.arrow").write_text("mine")
    with pytest.raises(InputError, match="already exists"):
        convert(src, tmp_path / "b.arrow")
    assert (tmp_path / "b.arrow").read_text() == "mine"
    with pytest.raises(InputError, match="unsupported trace extension"):
        convert(src, tmp_path / "b.csv")
    with pytest.raises(InputError, match="same file"):
        convert(src, src, force=True)
    # A corrupt input fails mid-way: neither the output nor its .partial remains.
    with h5py.File(src, "r+") as f:
        f["expert_ids"].id.write_direct_chunk((0, 0, 0), b"garbage" * 10)
    with pytest.raises(InputError, match="cannot read expert_ids"):
        convert(src, tmp_path / "c.arrow")
    assert not (tmp_path / "c.arrow").exists() and not partial_path(tmp_path / "c.arrow").exists()


# ---------------------------------------------------------------- streaming
def _big_trace(tmp_path: Path, suffix: str, repeats: int = 6) -> tuple[Path, TraceMetadata, TraceChunk]:
    meta = make_meta("olmoe-1b-7b")
    block = make_chunk(meta, 1 << 16, seed=3)
    with open_writer(tmp_path / f"big{suffix}", meta) as writer:
        for _ in range(repeats):
            writer.append(block)
    return tmp_path / f"big{suffix}", meta, block


@pytest.mark.parametrize("suffix", ENCODINGS)
def test_streaming_memory_is_bounded_by_the_chunk(tmp_path: Path, suffix: str) -> None:
    path, meta, block = _big_trace(tmp_path, suffix)
    ids_bytes = block.expert_ids.nbytes  # type: ignore[union-attr]
    chunk_tokens = 5000
    with open_trace(path) as trace:
        total = trace.num_tokens
        assert total == 6 * (1 << 16)  # 50 MB of ids: several times any bound below
        tracemalloc.start()
        arrow_peak, sizes, seen = 0, [], 0
        for chunk in trace.iter_chunks(["expert_ids"], chunk_tokens):
            assert set(chunk.present()) == {"expert_ids"}
            expected = block.expert_ids[seen % (1 << 16): seen % (1 << 16) + chunk.num_tokens]  # type: ignore[index]
            if seen % (1 << 16) + chunk.num_tokens <= 1 << 16:
                np.testing.assert_array_equal(chunk.expert_ids, expected)
            sizes.append(chunk.num_tokens)
            seen += chunk.num_tokens
            arrow_peak = max(arrow_peak, pa.total_allocated_bytes())
        _, numpy_peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
    assert sizes[:-1] == [chunk_tokens] * (len(sizes) - 1) and sum(sizes) == total
    # NumPy memory: a chunk plus one storage block (HDF5 reads whole 8192-row chunks; Arrow 65536-row
    # batches).
    assert numpy_peak < 3 * ids_bytes / 2
    # Arrow's own buffers: a few record batches (the one in use, one still referenced by a pending chunk,
    # PREFETCH decoded ahead, decoder scratch), of ids only: decoding the weights too would triple this.
    batch_ids = batch_rows(meta) * ids_bytes // (1 << 16)
    assert arrow_peak < 10 * batch_ids < total * ids_bytes // (1 << 16) / 1.5


def test_ids_only_reads_never_touch_weights_hdf5(tmp_path: Path) -> None:
    meta = make_meta()
    chunk = make_chunk(meta, 20_000)
    path = write_trace(tmp_path / "t.h5", meta, chunk)
    with h5py.File(path, "r+") as f:  # destroy every stored chunk of the weights
        ds = f["expert_weights"]
        for start in range(0, ds.shape[0], ds.chunks[0]):
            ds.id.write_direct_chunk((start, 0, 0), b"\xff" * 64)
    with open_trace(path) as trace:
        ids = np.concatenate([c.expert_ids for c in trace.iter_chunks(["expert_ids"], 3000)])  # type: ignore[misc]
        np.testing.assert_array_equal(ids, chunk.expert_ids)
        with pytest.raises(InputError, match="cannot read expert_weights"):
            trace.read_all(["expert_weights"])


# ---------------------------------------------------------------- shards
@pytest.mark.parametrize("suffix", ENCODINGS)
def test_shards_read_as_one_trace(tmp_path: Path, suffix: str) -> None:
    chunks = []
    for i in range(3):
        meta = make_meta(created_at=f"2026-01-0{i + 1}", notes={"shard_index": i})
        chunks.append(make_chunk(meta, 300 + 100 * i, seed=i))
        write_trace(tmp_path / f"s{i}{suffix}", meta, chunks[-1])
    with open_trace(str(tmp_path / f"s*{suffix}")) as trace:
        assert len(trace.shards) == 3 and trace.num_tokens == 1200
        assert_same(TraceChunk.concat(chunks), trace.read_all())
        sizes = [c.num_tokens for c in trace.iter_chunks(["expert_ids"], 500)]
        assert sizes == [500, 500, 200]  # chunks span shard boundaries


def test_disagreeing_shards_are_rejected(tmp_path: Path) -> None:
    good = make_meta()
    write_trace(tmp_path / "a.h5", good, make_chunk(good, 10))
    other = make_meta(top_k=3)
    write_trace(tmp_path / "b.arrow", other, make_chunk(other, 10))
    with pytest.raises(InputError, match=r"b\.arrow: shard disagrees .* top_k"):
        open_trace([tmp_path / "a.h5", tmp_path / "b.arrow"])
    with pytest.raises(InputError, match="no file matches"):
        open_trace(str(tmp_path / "nothing*.h5"))


def test_unknown_schema_version_and_non_traces(tmp_path: Path) -> None:
    meta = make_meta()
    path = write_trace(tmp_path / "t.h5", meta, make_chunk(meta, 10))
    with h5py.File(path, "r+") as f:
        data = json.loads(f.attrs["metadata"])
        data["schema_version"] = 99
        f.attrs["metadata"] = json.dumps(data)
    with pytest.raises(InputError, match="unknown trace schema version 99"):
        open_trace(path)
    with h5py.File(tmp_path / "plain.h5", "w") as f:
        f["x"] = [1, 2]
    with pytest.raises(InputError, match="not a moe-trace trace"):
        open_trace(tmp_path / "plain.h5")
    feather.write_feather(pa.table({"x": [1, 2]}), str(tmp_path / "plain.arrow"))
    with pytest.raises(InputError, match="not a moe-trace trace"):
        open_trace(tmp_path / "plain.arrow")


# ---------------------------------------------------------------- crash safety
WRITER = textwrap.dedent(
    """
    import sys
    sys.path[:0] = [sys.argv[3], sys.argv[3] + "/tests"]
    from trace_fixtures import make_chunk, make_meta
    from traces import open_writer
    writer = open_writer(sys.argv[1], make_meta("olmoe-1b-7b"))
    batch = int(sys.argv[2])
    i = 0
    while True:  # appends until killed
        writer.append(make_chunk(writer.metadata, batch, seed=i))
        print(i, flush=True)
        i += 1
    """
)


@pytest.mark.parametrize("suffix", ENCODINGS)
def test_sigkill_mid_write_keeps_completed_batches_and_resumes(tmp_path: Path, suffix: str) -> None:
    path, batch = tmp_path / f"t{suffix}", 20_000
    script = tmp_path / "writer.py"
    script.write_text(WRITER)
    proc = subprocess.Popen([sys.executable, str(script), str(path), str(batch), str(ROOT)],
                            stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    for _ in range(3):  # three batches reported complete; the writer is now inside the fourth
        assert proc.stdout.readline()
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not path.exists()  # the final name never holds a half-written trace
    meta = make_meta("olmoe-1b-7b")
    with open_trace(partial_path(path)) as trace:
        assert not trace.complete
        done = trace.num_tokens // batch
        assert trace.num_tokens == done * batch and done >= 3  # whole batches only
        assert_same(TraceChunk.concat([make_chunk(meta, batch, seed=i) for i in range(done)]),
                    trace.read_all())
    with pytest.raises(InputError, match="interrupted trace"):
        open_writer(path, meta)
    with open_writer(path, meta, resume=True) as writer:
        assert writer.num_tokens == done * batch
        writer.append(make_chunk(meta, batch, seed=done))
    with open_trace(path) as trace:
        assert trace.complete and not partial_path(path).exists()
        assert_same(TraceChunk.concat([make_chunk(meta, batch, seed=i) for i in range(done + 1)]),
                    trace.read_all())


@pytest.mark.parametrize("suffix", ENCODINGS)
def test_exception_in_writer_leaves_a_readable_partial(tmp_path: Path, suffix: str) -> None:
    meta = make_meta()
    chunk = make_chunk(meta, 100)
    path = tmp_path / f"t{suffix}"
    with pytest.raises(RuntimeError), open_writer(path, meta) as writer:
        writer.append(chunk)
        raise RuntimeError("model crashed")
    assert not path.exists()
    with open_trace(partial_path(path)) as trace:
        assert not trace.complete
        assert_same(chunk, trace.read_all())


def test_layer_loads_by_hand():
    """One LayerLoad for `moe-sim info` and MoEProfiler: a hand-checked layer and an empty one."""
    from traces.stats import layer_loads

    busy, empty = layer_loads(np.array([[6, 2, 0, 0], [0, 0, 0, 0]]), [3, 5])
    assert (busy.layer, busy.assignments, busy.top_expert, busy.idle) == (3, 8, 0, 2)
    assert busy.top_share == 0.75 and busy.max_over_mean == 3.0  # 6 / (8 / 4)
    expected = -(0.75 * np.log(0.75) + 0.25 * np.log(0.25)) / np.log(4)
    assert busy.entropy == pytest.approx(expected)
    assert (empty.assignments, empty.max_over_mean, empty.idle, empty.top_share) == (0, 0.0, 4, 0.25)
