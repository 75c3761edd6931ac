"""HDF5 encoding: one resizable, chunked, compressed dataset per column, metadata as a JSON root attribute.

Layout: /seq_id [T], /position [T], /token_id [T], /phase [T], /step [T],
/expert_ids [T, L, K], /expert_weights [T, L, K], /router_logits [T, L, E].
Root attributes: format, schema_version, metadata (JSON), num_tokens (rows committed), status.
"""

from __future__ import annotations

from pathlib import Path

import h5py

from traces.chunk import TraceChunk
from traces.errors import InputError
from traces.schema import FORMAT_NAME, SCHEMA_VERSION, TraceMetadata

HDF5_MAGIC = b"\x89HDF\r\n\x1a\n"
CHUNK_TOKENS = 8192  # HDF5 chunk along tokens: 1 MiB of OLMoE ids, large enough for fast sequential reads
COMPRESSIONS = ("lzf", "gzip", "none")


class Hdf5TraceWriter:
    """Appends TraceChunks to an HDF5 file; every append is flushed so a crash keeps completed batches."""

    def __init__(self, path: Path, metadata: TraceMetadata, compression: str = "lzf", append: bool = False):
        self.path = path
        self.metadata = metadata
        if append:
            self.file = h5py.File(path, "r+")
            self.num_tokens = int(self.file.attrs["num_tokens"])
            for name in metadata.stored_fields():  # drop rows past the last committed batch
                self.file[name].resize(self.num_tokens, axis=0)
            return
        self.file = h5py.File(path, "w")
        self.num_tokens = 0
        attrs = self.file.attrs
        attrs["format"] = FORMAT_NAME
        attrs["schema_version"] = SCHEMA_VERSION
        attrs["metadata"] = metadata.to_json()
        attrs["num_tokens"] = 0
        attrs["status"] = "partial"
        filters: dict = {}
        if compression == "lzf":
            filters = {"compression": "lzf", "shuffle": True}
        elif compression == "gzip":
            filters = {"compression": "gzip", "compression_opts": 1, "shuffle": True}
        for name in metadata.stored_fields():
            shape = metadata.field_shape(name)
            self.file.create_dataset(
                name,
                shape=(0, *shape),
                maxshape=(None, *shape),
                dtype=metadata.field_dtype(name),
                chunks=(CHUNK_TOKENS, *shape),
                **filters,
            )
        self.file.flush()

    def append(self, chunk: TraceChunk) -> None:
        n = chunk.num_tokens
        start, stop = self.num_tokens, self.num_tokens + n
        for name in self.metadata.stored_fields():
            ds = self.file[name]
            ds.resize(stop, axis=0)
            ds[start:stop] = getattr(chunk, name)
        # The row count is committed last: a reader never trusts rows past it.
        self.num_tokens = stop
        self.file.attrs["num_tokens"] = stop
        self.file.flush()

    def close(self, complete: bool) -> None:
        self.file.attrs["status"] = "complete" if complete else "partial"
        meta = TraceMetadata.from_json(self.file.attrs["metadata"])
        meta.status = self.file.attrs["status"]
        self.file.attrs["metadata"] = meta.to_json()
        self.file.close()


class Hdf5ShardReader:
    """Reads one HDF5 trace file, trusting only the committed rows."""

    def __init__(self, path: Path):
        self.path = path
        try:
            self.file = h5py.File(path, "r")
        except OSError as exc:
            raise InputError(f"{path}: cannot open as HDF5 ({_short(exc)}); the file may be truncated or corrupt") from exc
        attrs = self.file.attrs
        if attrs.get("format") != FORMAT_NAME or "metadata" not in attrs:
            self.file.close()
            raise InputError(f"{path}: HDF5 file is not a moe-trace trace")
        self.metadata = TraceMetadata.from_json(attrs["metadata"], str(path))
        self.metadata.status = str(attrs.get("status", "partial"))
        self.num_tokens = int(attrs["num_tokens"])
        for name in self.metadata.stored_fields():
            if name not in self.file:
                raise InputError(f"{path}: column {name} is missing")
            ds = self.file[name]
            want = self.metadata.field_shape(name)
            if ds.shape[1:] != want or ds.shape[0] < self.num_tokens:
                raise InputError(f"{path}: column {name} has shape {ds.shape}, expected ({self.num_tokens}, *{want})")

    def read(self, names: list[str], start: int, stop: int) -> TraceChunk:
        out = {}
        for name in names:
            try:
                out[name] = self.file[name][start:stop]
            except OSError as exc:  # a damaged chunk inside the file
                raise InputError(f"{self.path}: cannot read {name} rows {start}..{stop} ({_short(exc)})") from exc
        return TraceChunk(**out)

    def iter_blocks(self, names: list[str], block_tokens: int):
        # Read whole HDF5 chunks at a time: partial-chunk reads decompress the same chunk twice.
        step = max(CHUNK_TOKENS, (block_tokens // CHUNK_TOKENS) * CHUNK_TOKENS)
        for start in range(0, self.num_tokens, step):
            yield self.read(names, start, min(start + step, self.num_tokens))

    def close(self) -> None:
        self.file.close()


def _short(exc: BaseException) -> str:
    return str(exc).splitlines()[0] if str(exc) else type(exc).__name__


def is_hdf5(head: bytes) -> bool:
    return head.startswith(HDF5_MAGIC)
