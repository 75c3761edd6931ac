"""Arrow IPC encoding: the same columns as HDF5, routing columns as nested fixed-size lists.

expert_ids: FixedSizeList<FixedSizeList<uint8|uint16, K>, L>; router_logits: ...<float16, E>, L>.
Schema metadata: b"moe_trace" = metadata JSON. A cleanly closed file ends with a zero-row batch whose custom
metadata is {b"moe_trace_status": b"complete"}; a file without it is partial. A writer killed before its footer
leaves an IPC stream after the magic bytes, from which every completed batch is recovered.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pyarrow as pa

from traces.chunk import TraceChunk
from traces.errors import InputError
from traces.schema import TraceMetadata

ARROW_MAGIC = b"ARROW1"
META_KEY = b"moe_trace"
STATUS_KEY = b"moe_trace_status"
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
    return pa.schema(
        [pa.field(n, _arrow_type(meta, n), nullable=False) for n in meta.stored_fields()],
        metadata={META_KEY: meta.to_json().encode()},
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
    row_bytes = sum(meta.field_dtype(n).itemsize * int(np.prod(meta.field_shape(n))) for n in meta.stored_fields())
    return int(min(1 << 16, max(1 << 10, BATCH_BYTES // row_bytes)))


class ArrowTraceWriter:
    def __init__(self, path: Path, metadata: TraceMetadata, compression: str = DEFAULT_COMPRESSION):
        if compression not in COMPRESSIONS:
            raise InputError(f"--compression: Arrow supports {', '.join(COMPRESSIONS)}, not {compression!r}")
        self.path = path
        self.metadata = metadata
        self.schema = arrow_schema(metadata)
        self.batch_rows = batch_rows(metadata)
        codec = None if compression == "none" else pa.Codec(compression, compression_level=1 if compression == "zstd" else None)
        self.sink = pa.OSFile(str(path), "wb")
        self.writer = pa.ipc.new_file(self.sink, self.schema, options=pa.ipc.IpcWriteOptions(compression=codec))
        self.num_tokens = 0

    def append(self, chunk: TraceChunk) -> None:
        for start in range(0, chunk.num_tokens, self.batch_rows):
            part = chunk.slice(start, start + self.batch_rows) if chunk.num_tokens > self.batch_rows else chunk
            arrays = [_to_arrow(getattr(part, f.name), f.type) for f in self.schema]
            self.writer.write_batch(pa.RecordBatch.from_arrays(arrays, schema=self.schema))
            self.sink.flush()  # a batch is on disk before the next starts: a crash keeps it
            self.num_tokens += part.num_tokens

    def close(self, complete: bool) -> None:
        if complete:
            empty = self.schema.empty_table().to_batches()
            batch = empty[0] if empty else pa.RecordBatch.from_pylist([], schema=self.schema)
            self.writer.write_batch(batch, custom_metadata={STATUS_KEY: b"complete"})
        self.writer.close()
        self.sink.close()


class ArrowShardReader:
    """Reads one Arrow trace file; falls back to stream reading for a file whose writer died."""

    encoding = "arrow"

    def __init__(self, path: Path):
        self.path = path
        # Plain reads, not a memory map: mapped pages count as the reader's resident memory and would grow with
        # the file; reads keep memory to the batches in flight.
        self.source = pa.OSFile(str(path), "r")
        self.recovered_batches: int | None = None  # set only for footer-less (crashed) files
        try:
            self.reader: pa.ipc.RecordBatchFileReader | None = pa.ipc.open_file(self.source)
            schema = self.reader.schema
            complete = self._has_complete_marker()
            num_tokens = _count_rows(self.source, self.reader)
        except (pa.ArrowInvalid, OSError):
            self.reader = None
            schema, num_tokens = self._recover_stream()
            complete = False
        raw = (schema.metadata or {}).get(META_KEY)
        if raw is None:
            raise InputError(f"{path}: Arrow file is not a moe-trace trace (no {META_KEY.decode()} metadata)")
        self.metadata = TraceMetadata.from_json(raw, str(path))
        self.metadata.status = "complete" if complete else "partial"
        self.schema = schema
        self.num_tokens = int(num_tokens)
        for name in self.metadata.stored_fields():
            if schema.get_field_index(name) < 0:
                raise InputError(f"{path}: column {name} is missing")

    def _has_complete_marker(self) -> bool:
        assert self.reader is not None
        n = self.reader.num_record_batches
        if n == 0:
            return False
        last = self.reader.get_batch_with_custom_metadata(n - 1)
        meta = last.custom_metadata or {}
        return meta.get(STATUS_KEY) == b"complete"

    def _open_stream(self, src: pa.NativeFile) -> pa.ipc.RecordBatchStreamReader:
        """The IPC stream inside a file format file (after its 8 magic bytes), read sequentially."""
        head = src.read(8)
        if len(head) < 8 or head[:6] != ARROW_MAGIC:
            raise InputError(f"{self.path}: not an Arrow IPC file")
        try:
            return pa.ipc.open_stream(src)
        except (pa.ArrowInvalid, OSError) as exc:
            raise InputError(f"{self.path}: Arrow file is truncated or corrupt ({exc})") from exc

    def _recover_stream(self) -> tuple[pa.Schema, int]:
        with pa.OSFile(str(self.path), "r") as src:
            stream = self._open_stream(src)
            count = rows = 0
            while True:  # count every batch that reads back whole; stop at the first damaged one
                try:
                    rows += stream.read_next_batch().num_rows
                except StopIteration:
                    break
                except (pa.ArrowInvalid, OSError):
                    break
                count += 1
        self.recovered_batches = count
        return stream.schema, rows

    def _batches(self, names: list[str]) -> Iterator[pa.RecordBatch]:
        if self.recovered_batches is not None:  # a crashed writer's file: replay its stream
            with pa.OSFile(str(self.path), "r") as src:
                stream = self._open_stream(src)
                for _ in range(self.recovered_batches):
                    yield stream.read_next_batch().select(names)
            return
        # Re-open with only the wanted columns so the others are never decompressed, and decompress the next
        # PREFETCH batches in threads while the caller works on this one.
        idx = [self.schema.get_field_index(n) for n in names]
        reader = pa.ipc.open_file(self.source, options=pa.ipc.IpcReadOptions(included_fields=idx))
        with ThreadPoolExecutor(max_workers=max(1, PREFETCH)) as pool:
            ahead: deque[Future[pa.RecordBatch]] = deque()
            for i in range(reader.num_record_batches):
                ahead.append(pool.submit(reader.get_batch, i))
                if len(ahead) > PREFETCH:
                    yield ahead.popleft().result()
            while ahead:
                yield ahead.popleft().result()

    def iter_blocks(self, names: list[str], block_tokens: int) -> Iterator[TraceChunk]:
        del block_tokens  # Arrow batches are read whole; the caller regroups them
        try:
            yield from self._chunks(names)
        except (pa.ArrowInvalid, pa.ArrowIOError, OSError) as exc:
            raise InputError(f"{self.path}: Arrow data is corrupt ({str(exc).splitlines()[0]})") from exc

    def _chunks(self, names: list[str]) -> Iterator[TraceChunk]:
        for batch in self._batches(names):
            if batch.num_rows == 0:
                continue
            yield TraceChunk(
                **{n: _to_numpy(batch.column(n), self.metadata.field_shape(n)) for n in names}
            )

    def close(self) -> None:
        self.source.close()


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
