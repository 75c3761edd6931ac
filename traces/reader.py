"""open_trace(): one file or several shards (paths, fsspec URLs or globs) read as one trace, in bounded-memory
chunks, whole or any token range."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Protocol

from traces import location as loc
from traces.chunk import TraceChunk
from traces.errors import InputError
from traces.location import Location
from traces.schema import ALL_FIELDS, TraceMetadata

DEFAULT_CHUNK_TOKENS = 1 << 16


class _Shard(Protocol):
    path: Location  # a local path, or the fsspec URL it was opened from
    encoding: str  # "hdf5" or "arrow"
    checked: bool  # the file carries block checksums (format 1.1), verified by every read
    metadata: TraceMetadata
    num_tokens: int

    def iter_blocks(self, names: list[str], block_tokens: int, start: int = 0,
                    stop: int | None = None) -> Iterator[TraceChunk]:
        """Consecutive blocks holding exactly rows [start, stop) (stop None: to the end)."""
        ...

    def close(self) -> None: ...


def open_shard(path: Location) -> _Shard:
    from traces.arrow_format import ArrowShardReader, is_arrow
    from traces.hdf5_format import Hdf5ShardReader, is_hdf5

    if isinstance(path, Path):
        if not path.exists():
            raise InputError(f"{path}: no such file")
        if path.is_dir():
            raise InputError(f"{path}: is a directory, not a trace file")
        with open(path, "rb") as fh:
            head = fh.read(8)
    else:
        loc.check_remote_file(path)
        with loc.open_binary(path) as fh:
            head = fh.read(8)
    if is_hdf5(head):
        return Hdf5ShardReader(path)
    if is_arrow(head):
        return ArrowShardReader(path)
    raise InputError(f"{path}: not a trace (neither HDF5 nor Arrow IPC)")


def expand_paths(paths: str | Path | Sequence[str | Path]) -> list[Location]:
    """Expand globs (of paths and URLs); a pattern that matches nothing is an error, a plain missing file is
    reported by open."""
    return loc.expand(paths)


class Trace:
    """A trace made of one or more shards with agreeing metadata. Shards are read in the order given."""

    def __init__(self, shards: list[_Shard]):
        self.shards = shards
        self.metadata = shards[0].metadata
        first = self.metadata.contract()
        for shard in shards[1:]:
            other = shard.metadata.contract()
            diff = sorted(k for k in first.keys() | other.keys() if first.get(k) != other.get(k))
            if diff:
                raise InputError(
                    f"{shard.path}: shard disagrees with {shards[0].path} on {', '.join(diff[:4])}"
                )

    @property
    def paths(self) -> list[Location]:
        return [s.path for s in self.shards]

    @property
    def locations(self) -> list[str]:
        """Each shard as another process or machine opens it (absolute paths, URLs), for open_trace there."""
        return [loc.portable(s.path) for s in self.shards]

    @property
    def num_tokens(self) -> int:
        return sum(s.num_tokens for s in self.shards)

    @property
    def complete(self) -> bool:
        return all(s.metadata.status == "complete" for s in self.shards)

    def iter_chunks(
        self, fields: Sequence[str] = ("expert_ids",), chunk_tokens: int = DEFAULT_CHUNK_TOKENS,
        start: int = 0, stop: int | None = None,
    ) -> Iterator[TraceChunk]:
        """Yield chunks of at most chunk_tokens tokens with only `fields` read from disk.

        With start/stop, only tokens [start, stop) are read, cut every chunk_tokens tokens from `start`: a
        range starting at a multiple of chunk_tokens yields the very chunks a whole pass yields there. Memory
        is bounded by the chunk size (plus one storage block), whatever the trace's length.
        """
        names = list(fields)
        stored = set(self.metadata.stored_fields())
        for name in names:
            if name not in ALL_FIELDS:
                raise InputError(f"unknown trace field {name!r}")
            if name not in stored:
                raise InputError(f"{self.shards[0].path}: this trace does not store {name}")
        stop = self.num_tokens if stop is None else min(stop, self.num_tokens)
        pending: list[TraceChunk] = []
        pending_rows = 0
        first = 0  # global index of the shard's first row
        for shard in self.shards:
            lo, hi = max(start - first, 0), min(stop - first, shard.num_tokens)
            first += shard.num_tokens
            if lo >= hi:
                continue
            for block in shard.iter_blocks(names, chunk_tokens, lo, hi):
                row = 0
                while row < block.num_tokens:
                    take = min(chunk_tokens - pending_rows, block.num_tokens - row)
                    if row == 0 and take == block.num_tokens:
                        pending.append(block)
                    else:
                        pending.append(block.slice(row, row + take))
                    pending_rows += take
                    row += take
                    if pending_rows == chunk_tokens:
                        yield TraceChunk.concat(pending)
                        pending, pending_rows = [], 0
        if pending:
            yield TraceChunk.concat(pending)

    def read_all(self, fields: Sequence[str] | None = None) -> TraceChunk:
        """The whole trace in memory (small traces and tests)."""
        names = list(fields) if fields is not None else self.metadata.stored_fields()
        chunks = list(self.iter_chunks(names, chunk_tokens=max(1, self.num_tokens)))
        if not chunks:
            return TraceChunk(**{n: _empty(self.metadata, n) for n in names})
        return TraceChunk.concat(chunks)

    def close(self) -> None:
        for shard in self.shards:
            shard.close()

    def __enter__(self) -> Trace:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _empty(meta: TraceMetadata, name: str):
    import numpy as np

    return np.zeros((0, *meta.field_shape(name)), dtype=meta.field_dtype(name))


def open_trace(paths: str | Path | Sequence[str | Path]) -> Trace:
    """Open one trace file, several shards, or glob patterns, checking that the shards' metadata agree."""
    shards: list[_Shard] = []
    try:
        for path in expand_paths(paths):
            shards.append(open_shard(path))
        return Trace(shards)
    except BaseException:
        for shard in shards:
            shard.close()
        raise
