"""Traces opened by URL (file://, and fsspec's generic file-object path) and read over token ranges give the
same rows as a whole local read."""

from __future__ import annotations

import os

import numpy as np
import pytest
from sim_fixtures import random_ids, tiny_meta, write_ids

from traces import open_trace
from traces.arrow_format import ArrowShardReader
from traces.errors import InputError

pytest.importorskip("fsspec")


def _write(path, tokens: int, seed: int):
    rng = np.random.default_rng(seed)
    ids = random_ids(rng, tokens, 2, 8, 2)
    steps = np.cumsum(rng.random(tokens) < 0.05)
    phases = (rng.random(tokens) < 0.3).astype(np.uint8)
    return write_ids(path, tiny_meta(2, 8, 2), ids, steps, phases, append_rows=600)


@pytest.fixture(params=["h5", "arrow"])
def shards(request, tmp_path):
    # written in appends of 600 rows: several HDF5 blocks and Arrow record batches in each of two shards
    return [_write(tmp_path / f"part{i}.{request.param}", n, i) for i, n in enumerate((2500, 1800))]


FIELDS = ("expert_ids", "step", "phase")


def test_token_ranges_read_exactly_their_rows(shards):
    with open_trace(shards) as tr:
        whole = tr.read_all(FIELDS)
        total = tr.num_tokens
        for start, stop, chunk in [(0, total, 512), (1024, 3072, 512), (1000, 1001, 64), (2499, 2501, 100),
                                   (2500, total, 700), (3000, 10 ** 9, 1 << 16), (17, 4000, 333)]:
            parts = list(tr.iter_chunks(FIELDS, chunk, start=start, stop=stop))
            assert all(p.num_tokens == chunk for p in parts[:-1])
            for name in FIELDS:
                got = np.concatenate([getattr(p, name) for p in parts])
                np.testing.assert_array_equal(got, getattr(whole, name)[start:min(stop, total)])
        assert list(tr.iter_chunks(FIELDS, 256, start=total, stop=total)) == []


def test_arrow_ranges_skip_whole_batches_unread(tmp_path):
    path = _write(tmp_path / "t.arrow", 3000, 5)
    with open_trace(path) as tr:
        shard = tr.shards[0]
        assert isinstance(shard, ArrowShardReader)
        assert shard._data_batch_rows() == [600] * 5 + [0]  # five data batches, then the completion mark
        parts = list(tr.iter_chunks(FIELDS, 100, start=1900, stop=2300))
        np.testing.assert_array_equal(np.concatenate([np.asarray(p.step) for p in parts]),
                                      np.asarray(tr.read_all(FIELDS).step)[1900:2300])


def test_an_aligned_range_yields_the_chunks_of_a_whole_pass(shards):
    with open_trace(shards) as tr:
        whole = list(tr.iter_chunks(FIELDS, 300))
        tail = list(tr.iter_chunks(FIELDS, 300, start=1200, stop=2700))
    assert len(tail) == 5
    for a, b in zip(whole[4:9], tail, strict=True):
        np.testing.assert_array_equal(a.expert_ids, b.expert_ids)


def test_file_urls_and_their_globs_open_as_paths(shards):
    pattern = f"file://{shards[0].parent}/part*{shards[0].suffix}"
    with open_trace(pattern) as by_url, open_trace(shards) as by_path:
        assert by_url.paths == by_path.paths
        np.testing.assert_array_equal(by_url.read_all(FIELDS).expert_ids, by_path.read_all(FIELDS).expert_ids)
        assert by_url.locations == [os.path.abspath(p) for p in shards]


def test_other_urls_are_read_through_fsspec_file_objects(shards):
    """simplecache::file:// is not a local path to the reader: it goes the way s3:// and gs:// go (an fsspec
    file object handed to h5py or pyarrow), and reads the same rows, whole and by range."""
    urls = [f"simplecache::file://{p}" for p in shards]
    with open_trace(urls) as remote, open_trace(shards) as local:
        assert remote.locations == urls
        assert remote.num_tokens == local.num_tokens
        a = remote.read_all(FIELDS)
        b = local.read_all(FIELDS)
        np.testing.assert_array_equal(a.expert_ids, b.expert_ids)
        part = np.concatenate([np.asarray(c.step) for c in remote.iter_chunks(("step",), 128, 2000, 3500)])
        np.testing.assert_array_equal(part, np.asarray(b.step)[2000:3500])


def test_bad_urls_are_one_line_errors(tmp_path):
    with pytest.raises(InputError, match="no such file"):
        open_trace(f"simplecache::file://{tmp_path}/missing.h5")
    with pytest.raises(InputError, match="no file matches"):
        open_trace(f"file://{tmp_path}/nothing*.h5")
    with pytest.raises(InputError, match="cannot open this URL"):
        open_trace("nosuchprotocol://bucket/trace.h5")
    with pytest.raises(InputError, match="file:///path"):
        open_trace("file://otherhost/trace.h5")
