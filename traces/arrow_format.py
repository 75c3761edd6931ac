"""Arrow IPC encoding: the same columns as HDF5, routing columns as nested fixed-size lists.

expert_ids: FixedSizeList<FixedSizeList<uint8|uint16, K>, L>; router_logits: ...<float16, E>, L>.
Schema metadata: b"moe_trace" = metadata JSON. A cleanly closed file ends with a zero-row batch whose custom
metadata is {b"moe_trace_status": b"complete"}; a file without it is partial. A writer killed before its
footer leaves an IPC stream after the magic bytes, from which every completed batch is recovered.
"""

from __future__ import annotations

import json
from collections import deque
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from traces import location
from traces.checksum import checksum, text_digest
from traces.chunk import TraceChunk
from traces.errors import InputError
from traces.location import Location
from traces.schema import FORMAT_MINOR, TraceMetadata
from traces.watchdog import bounded_read

ARROW_MAGIC = b"ARROW1"
META_KEY = b"moe_trace"
STATUS_KEY = b"moe_trace_status"
# Format 1.1 checksums: the schema carries the metadata JSON's SHA-256; each data batch's custom metadata
# carries {"index", "row0", "rows", "sums": {column: [s1, s2]}} (traces/checksum.py); the completion mark
# carries the totals {"batches", "rows"}.
HEADER_KEY = b"moe_trace_sha256"
BLOCK_KEY = b"moe_trace_block"
TOTALS_KEY = b"moe_trace_totals"
# Any failure of the IPC decoder on a corrupt file (ArrowMemoryError is what a huge declared size gives).
ARROW_ERRORS = (pa.ArrowException, OSError, MemoryError, ValueError, IndexError, KeyError, TypeError)
COMPRESSIONS = ("zstd", "lz4", "none")
# zstd (level 1) shrinks OLMoE expert ids by a quarter; LZ4 finds no repeats in them and saves nothing.
DEFAULT_COMPRESSION = "zstd"
BATCH_BYTES = 8 << 20  # target record-batch size: a reader holds a few batches, so this bounds its memory
PREFETCH = 2  # batches decompressed ahead by reader threads (pyarrow releases the GIL while decompressing)


def _arrow_type(meta: TraceMetadata, name: str) -> pa.DataType:
    scalar = pa.from_numpy_dtype(meta.field_dtype(name))
    shape = meta.field_shape(name)
    for size in reversed(shape):
        scalar = pa.list_(scalar, size)
    return scalar


def arrow_schema(meta: TraceMetadata) -> pa.Schema:
    text = meta.to_json().encode()
    return pa.schema(
        [pa.field(n, _arrow_type(meta, n), nullable=False) for n in meta.stored_fields()],
        metadata={META_KEY: text, HEADER_KEY: text_digest(text).encode()},
    )


def _to_arrow(values: np.ndarray, type_: pa.DataType) -> pa.Array:
    flat = pa.array(np.ascontiguousarray(values).reshape(-1))
    sizes = []
    while pa.types.is_fixed_size_list(type_):
        sizes.append(type_.list_size)
        type_ = type_.value_type
    for size in reversed(sizes):
        flat = pa.FixedSizeListArray.from_arrays(flat, size)
    return flat


def _to_numpy(column: pa.Array | pa.ChunkedArray, shape: tuple[int, ...]) -> np.ndarray:
    if isinstance(column, pa.ChunkedArray):
        column = column.combine_chunks()
    n = len(column)
    for _ in shape:
        column = column.flatten()
    return column.to_numpy(zero_copy_only=False).reshape(n, *shape)


def batch_rows(meta: TraceMetadata) -> int:
    """Rows per record batch: about BATCH_BYTES of raw columns, between 1024 and 65536 rows."""
    row_bytes = sum(meta.field_dtype(n).itemsize * int(np.prod(meta.field_shape(n)))
                    for n in meta.stored_fields())
    return int(min(1 << 16, max(1 << 10, BATCH_BYTES // row_bytes)))


class ArrowTraceWriter:
    def __init__(self, path: Path, metadata: TraceMetadata, compression: str = DEFAULT_COMPRESSION):
        if compression not in COMPRESSIONS:
            raise InputError(f"--compression: Arrow supports {', '.join(COMPRESSIONS)}, not {compression!r}")
        self.path = path
        self.metadata = metadata
        metadata.format_minor = FORMAT_MINOR
        self.schema = arrow_schema(metadata)
        self.batch_rows = batch_rows(metadata)
        codec = None if compression == "none" else pa.Codec(compression, compression_level=1
                                                            if compression == "zstd" else None)
        self.sink = pa.OSFile(str(path), "wb")
        self.writer = pa.ipc.new_file(self.sink, self.schema,
                                      options=pa.ipc.IpcWriteOptions(compression=codec))
        self.num_tokens = 0
        self.num_batches = 0

    def append(self, chunk: TraceChunk) -> None:
        for start in range(0, chunk.num_tokens, self.batch_rows):
            part = chunk.slice(start,
                               start + self.batch_rows) if chunk.num_tokens > self.batch_rows else chunk
            arrays = [_to_arrow(getattr(part, f.name), f.type) for f in self.schema]
            block = {"index": self.num_batches, "row0": self.num_tokens, "rows": part.num_tokens,
                     "sums": {f.name: checksum(getattr(part, f.name)) for f in self.schema}}
            self.writer.write_batch(pa.RecordBatch.from_arrays(arrays, schema=self.schema),
                                    custom_metadata={BLOCK_KEY: json.dumps(block).encode()})
            self.sink.flush()  # a batch is on disk before the next starts: a crash keeps it
            self.num_tokens += part.num_tokens
            self.num_batches += 1

    def close(self, complete: bool) -> None:
        if complete:
            empty = self.schema.empty_table().to_batches()
            batch = empty[0] if empty else pa.RecordBatch.from_pylist([], schema=self.schema)
            totals = json.dumps({"batches": self.num_batches, "rows": self.num_tokens}).encode()
            self.writer.write_batch(batch, custom_metadata={STATUS_KEY: b"complete", TOTALS_KEY: totals})
        self.writer.close()
        self.sink.close()


class ArrowShardReader:
    """Reads one Arrow trace file; falls back to stream reading for a file whose writer died."""

    encoding = "arrow"

    def __init__(self, path: Location):
        self.path = path
        self._batch_rows: list[int] | None = None  # rows of each data batch, read when a range needs them
        self.source = self._open_source()
        try:
            with bounded_read(str(path)):  # the footer, the completion mark and the row counts
                self._open()
        except BaseException:
            self.source.close()
            raise

    def _open_source(self) -> pa.NativeFile:
        # Plain reads, not a memory map: mapped pages count as the reader's resident memory and would grow
        # with the file; reads keep memory to the batches in flight. A URL is read through fsspec.
        if isinstance(self.path, Path):
            return pa.OSFile(str(self.path), "r")
        return pa.PythonFile(location.open_binary(self.path), mode="r")

    def _open(self) -> None:
        path = self.path
        self.recovered_batches: int | None = None  # set only for footer-less (crashed) files
        totals: dict | None = None
        try:
            try:
                self.reader: pa.ipc.RecordBatchFileReader | None = pa.ipc.open_file(self.source)
                schema = self.reader.schema
                complete, totals = self._completion_mark()
                num_tokens = _count_rows(self.source, self.reader)
            except (pa.ArrowInvalid, OSError):
                self.reader = None
                schema, num_tokens = self._recover_stream()
                complete = False
        except ARROW_ERRORS as exc:
            raise InputError(f"{path}: Arrow file is truncated or corrupt ({_short(exc)})") from exc
        raw = (schema.metadata or {}).get(META_KEY)
        if raw is None:
            raise InputError(f"{path}: Arrow file is not a moe-trace trace (no {META_KEY.decode()} metadata)")
        self.metadata = TraceMetadata.from_json(raw, str(path))
        self.metadata.status = "complete" if complete else "partial"
        self.schema = schema
        self.num_tokens = int(num_tokens)
        digest = (schema.metadata or {}).get(HEADER_KEY)
        self.checked = self.metadata.format_minor >= 1 or digest is not None
        if self.checked and digest != text_digest(raw).encode():
            raise InputError(f"{path}: checksum mismatch in the schema metadata; the file is corrupt")
        if self.checked and complete and totals != {"batches": self._data_batches(), "rows": self.num_tokens}:
            raise InputError(f"{path}: the completion mark's totals {totals} do not match the file's batches")
        for name in self.metadata.stored_fields():
            if schema.get_field_index(name) < 0:
                raise InputError(f"{path}: column {name} is missing")

    def _completion_mark(self) -> tuple[bool, dict | None]:
        assert self.reader is not None
        n = self.reader.num_record_batches
        if n == 0:
            return False, None
        last = self.reader.get_batch_with_custom_metadata(n - 1)
        meta = last.custom_metadata or {}
        if meta.get(STATUS_KEY) != b"complete":
            return False, None
        try:
            totals = json.loads(meta.get(TOTALS_KEY, b"null"))
        except (ValueError, UnicodeDecodeError):
            totals = "unreadable"
        return True, totals

    def _data_batches(self) -> int:
        assert self.reader is not None
        return self.reader.num_record_batches - 1  # all but the zero-row completion mark

    def _open_stream(self, src: pa.NativeFile) -> pa.ipc.RecordBatchStreamReader:
        """The IPC stream inside a file format file (after its 8 magic bytes), read sequentially."""
        head = src.read(8)
        if len(head) < 8 or head[:6] != ARROW_MAGIC:
            raise InputError(f"{self.path}: not an Arrow IPC file")
        try:
            return pa.ipc.open_stream(src)
        except ARROW_ERRORS as exc:
            raise InputError(f"{self.path}: Arrow file is truncated or corrupt ({_short(exc)})") from exc

    def _recover_stream(self) -> tuple[pa.Schema, int]:
        with self._open_source() as src:
            stream = self._open_stream(src)
            count = rows = 0
            while True:  # count every batch that reads back whole; stop at the first damaged one
                try:
                    rows += stream.read_next_batch().num_rows
                except StopIteration:
                    break
                except ARROW_ERRORS:
                    break
                count += 1
        self.recovered_batches = count
        return stream.schema, rows

    def _batches(self, names: list[str], first: int = 0) -> Iterator[tuple[pa.RecordBatch, dict | None]]:
        """Batches from file batch `first` on (a crashed writer's stream: from the start)."""
        if self.recovered_batches is not None:  # a crashed writer's file: replay its stream
            with self._open_source() as src:
                stream = self._open_stream(src)
                for _ in range(self.recovered_batches):
                    with bounded_read(str(self.path)):
                        got = stream.read_next_batch_with_custom_metadata()
                    yield got.batch.select(names), got.custom_metadata
            return
        # Re-open with only the wanted columns so the others are never decompressed, and decompress the next
        # PREFETCH batches in threads while the caller works on this one.
        idx = [self.schema.get_field_index(n) for n in names]
        reader = pa.ipc.open_file(self.source, options=pa.ipc.IpcReadOptions(included_fields=idx))
        with ThreadPoolExecutor(max_workers=max(1, PREFETCH)) as pool:
            ahead: deque[Future] = deque()
            for i in range(first, reader.num_record_batches):
                ahead.append(pool.submit(_read_batch, reader, i, str(self.path)))
                if len(ahead) > PREFETCH:
                    got = ahead.popleft().result()
                    yield got.batch, got.custom_metadata
            while ahead:
                got = ahead.popleft().result()
                yield got.batch, got.custom_metadata

    def iter_blocks(self, names: list[str], block_tokens: int, start: int = 0,
                    stop: int | None = None) -> Iterator[TraceChunk]:
        del block_tokens  # Arrow batches are read whole; the caller regroups them
        stop = self.num_tokens if stop is None else min(stop, self.num_tokens)
        try:
            yield from self._chunks(names, start, stop)
        except ARROW_ERRORS as exc:
            raise InputError(f"{self.path}: Arrow data is corrupt ({_short(exc)})") from exc

    def _chunks(self, names: list[str], start: int, stop: int) -> Iterator[TraceChunk]:
        """Rows [start, stop): whole batches are read (and verified), then cut."""
        first = index = row0 = 0
        if start > 0 and self.recovered_batches is None:  # skip the batches before `start` unread
            rows = self._data_batch_rows()
            while first < len(rows) and row0 + rows[first] <= start:
                index += rows[first] > 0
                row0 += rows[first]
                first += 1
        for batch, custom in self._batches(names, first):
            if row0 >= stop:
                return
            if batch.num_rows == 0:
                continue
            rows0, row0 = row0, row0 + batch.num_rows
            if row0 <= start:  # a crashed writer's stream is read from its start
                index += 1
                continue
            # O(columns): declared lengths against buffer sizes, before any slicing trusts them
            batch.validate()
            values = {n: _to_numpy(batch.column(n), self.metadata.field_shape(n)) for n in names}
            if self.checked:
                self._verify(index, rows0, batch.num_rows, custom, values)
            index += 1
            chunk = TraceChunk(**values)
            if rows0 < start or row0 > stop:
                chunk = chunk.slice(max(start - rows0, 0), min(stop, row0) - rows0)
            yield chunk

    def _data_batch_rows(self) -> list[int]:
        """Rows of every batch of the file, from its one-byte phase column only (read once)."""
        if self._batch_rows is None:
            assert self.reader is not None
            index = max(self.schema.get_field_index("phase"), 0)
            narrow = pa.ipc.open_file(self.source, options=pa.ipc.IpcReadOptions(included_fields=[index]))
            self._batch_rows = [narrow.get_batch(i).num_rows for i in range(narrow.num_record_batches)]
        return self._batch_rows

    def _verify(self, index: int, row0: int, rows: int, custom: dict | None,
                values: dict[str, np.ndarray]) -> None:
        where = f"{self.path}: record batch {index} (rows {row0}..{row0 + rows})"
        try:
            block = json.loads((custom or {})[BLOCK_KEY])
            sums = block["sums"]
            placed = (block["index"], block["row0"], block["rows"]) == (index, row0, rows)
        except (KeyError, TypeError, ValueError, UnicodeDecodeError) as exc:
            raise InputError(f"{where}: its checksum record is missing or damaged") from exc
        if not placed:
            raise InputError(f"{where}: holds the rows of batch {block['index']} (rows {block['row0']}.."
                             f"{block['row0'] + block['rows']}); the file is corrupt")
        for name, value in values.items():
            want = sums.get(name) if isinstance(sums, dict) else None
            if want is None or list(checksum(value)) != list(want):
                raise InputError(f"{where}: checksum mismatch in {name}; the file is corrupt")

    def close(self) -> None:
        self.source.close()


def _read_batch(reader: pa.ipc.RecordBatchFileReader, index: int, what: str) -> Any:
    """Batch `index` with its custom metadata, under the data-read deadline (traces.watchdog)."""
    with bounded_read(what):
        return reader.get_batch_with_custom_metadata(index)


def _short(exc: BaseException) -> str:
    text = str(exc).splitlines()[0] if str(exc) else ""
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def chunk_to_table(chunk: TraceChunk, meta: TraceMetadata) -> pa.Table:
    """In-memory Arrow form of a chunk (for users who want a pyarrow Table)."""
    schema = arrow_schema(meta)
    return pa.Table.from_arrays([_to_arrow(getattr(chunk, f.name), f.type) for f in schema], schema=schema)


def is_arrow(head: bytes) -> bool:
    return head.startswith(ARROW_MAGIC)


def _count_rows(source: pa.NativeFile, reader: pa.ipc.RecordBatchFileReader) -> int:
    """Rows in an IPC file: from the batch headers where pyarrow can (older releases lack count_rows),
    else by reading the one-byte `phase` column of each batch."""
    if hasattr(reader, "count_rows"):
        return int(reader.count_rows())
    index = reader.schema.get_field_index("phase")
    options = pa.ipc.IpcReadOptions(included_fields=[max(index, 0)])
    narrow = pa.ipc.open_file(source, options=options)
    return sum(narrow.get_batch(i).num_rows for i in range(narrow.num_record_batches))
