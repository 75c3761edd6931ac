"""HDF5 encoding: one resizable, chunked, compressed dataset per column, metadata as a JSON root attribute.

Layout: /seq_id [T], /position [T], /token_id [T], /phase [T], /step [T],
/expert_ids [T, L, K], /expert_weights [T, L, K], /router_logits [T, L, E].
Root attributes: format, schema_version, metadata (JSON), num_tokens (rows committed), status.

Compression (per dataset, chosen when the file is created): "lz4" (default) and "zstd" are Blosc with bit-shuffle
from hdf5plugin: bit-shuffle exposes the unused high bits of expert ids (64 experts use 6 of 8 bits) and the
exponent bits of weights, and Blosc decompresses at GB/s, so ids-only reads stay above 10M tokens/s while files
shrink by a quarter. Readers need `import hdf5plugin` before h5py opens the file. "gzip" is built into every HDF5
library (readable by any HDF5 tool) but reads about 10x slower; "lzf" ships with h5py; "none" stores raw.
"""

from __future__ import annotations

from pathlib import Path

import h5py
import hdf5plugin  # registers the Blosc filter with HDF5, for reading as well as writing

from traces.chunk import TraceChunk
from traces.errors import InputError
from traces.schema import FORMAT_NAME, SCHEMA_VERSION, TraceMetadata

HDF5_MAGIC = b"\x89HDF\r\n\x1a\n"
CHUNK_TOKENS = 8192  # HDF5 chunk along tokens: 1 MiB of OLMoE ids, large enough for fast sequential reads
COMPRESSIONS = ("lz4", "zstd", "gzip", "lzf", "none")
DEFAULT_COMPRESSION = "lz4"


def dataset_filters(compression: str) -> dict:
    """h5py create_dataset keyword arguments for a compression name."""
    if compression == "lz4":
        return dict(hdf5plugin.Blosc(cname="lz4", clevel=5, shuffle=hdf5plugin.Blosc.BITSHUFFLE))
    if compression == "zstd":
        return dict(hdf5plugin.Blosc(cname="zstd", clevel=1, shuffle=hdf5plugin.Blosc.BITSHUFFLE))
    if compression == "gzip":
        return {"compression": "gzip", "compression_opts": 1, "shuffle": True}
    if compression == "lzf":
        return {"compression": "lzf", "shuffle": True}
    if compression == "none":
        return {}
    raise InputError(f"--compression: HDF5 supports {', '.join(COMPRESSIONS)}, not {compression!r}")


class Hdf5TraceWriter:
    """Appends TraceChunks to an HDF5 file; every append is flushed so a crash keeps completed batches."""

    def __init__(
        self, path: Path, metadata: TraceMetadata, compression: str = DEFAULT_COMPRESSION, append: bool = False
    ):
        self.path = path
        self.metadata = metadata
        if append:
            self.file = h5py.File(path, "r+")
            self.num_tokens = int(self.file.attrs["num_tokens"])
            for name in metadata.stored_fields():  # drop rows past the last committed batch
                self.file[name].resize(self.num_tokens, axis=0)
            return
        filters = dataset_filters(compression)
        self.file = h5py.File(path, "w")
        self.num_tokens = 0
        attrs = self.file.attrs
        attrs["format"] = FORMAT_NAME
        attrs["schema_version"] = SCHEMA_VERSION
        attrs["metadata"] = metadata.to_json()
        attrs["num_tokens"] = 0
        attrs["status"] = "partial"
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

    encoding = "hdf5"

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
        chunk_rows = max((self.file[n].chunks or (CHUNK_TOKENS,))[0] for n in names) if names else CHUNK_TOKENS
        step = max(chunk_rows, (block_tokens // chunk_rows) * chunk_rows)
        for start in range(0, self.num_tokens, step):
            yield self.read(names, start, min(start + step, self.num_tokens))

    def close(self) -> None:
        self.file.close()


def _short(exc: BaseException) -> str:
    return str(exc).splitlines()[0] if str(exc) else type(exc).__name__


def is_hdf5(head: bytes) -> bool:
    return head.startswith(HDF5_MAGIC)
