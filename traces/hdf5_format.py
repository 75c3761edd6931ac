"""HDF5 encoding: one resizable, chunked, compressed dataset per column, metadata as a JSON root attribute.

Layout: /seq_id [T], /position [T], /token_id [T], /phase [T], /step [T],
/expert_ids [T, L, K], /expert_weights [T, L, K], /router_logits [T, L, E].
Root attributes: format, schema_version, metadata (JSON), num_tokens (rows committed), status.

Compression (per dataset, chosen when the file is created): "lz4" (default) and "zstd" are Blosc with
bit-shuffle from hdf5plugin: bit-shuffle exposes the unused high bits of expert ids (64 experts use 6 of 8
bits) and the exponent bits of weights, and Blosc decompresses at GB/s, so ids-only reads stay above 10M
tokens/s while files shrink by a quarter. Readers need `import hdf5plugin` before h5py opens the file. "gzip"
is built into every HDF5 library (readable by any HDF5 tool) but reads about 10x slower; "lzf" ships with
h5py; "none" stores raw.
"""

from __future__ import annotations

import json
from pathlib import Path

import h5py
import hdf5plugin  # registers the Blosc filter with HDF5, for reading as well as writing
import numpy as np

from traces import location
from traces.checksum import BlockSums, block_checksums, text_digest
from traces.chunk import TraceChunk
from traces.errors import InputError
from traces.location import Location
from traces.schema import FORMAT_MINOR, FORMAT_NAME, SCHEMA_VERSION, TraceMetadata
from traces.watchdog import bounded_read, run_bounded

HDF5_MAGIC = b"\x89HDF\r\n\x1a\n"
CHUNK_TOKENS = 8192  # HDF5 chunk along tokens: 1 MiB of OLMoE ids, large enough for fast sequential reads
COMPRESSIONS = ("lz4", "zstd", "gzip", "lzf", "none")
DEFAULT_COMPRESSION = "lz4"
# Format 1.1 block checksums: one (s1, s2) pair per column per CHECK_ROWS rows, the same rows as a storage
# chunk.
CHECK_ROWS = CHUNK_TOKENS
BLOCK_SUMS = "block_checksums"  # dataset [full blocks, columns, 2] uint64, columns in stored_fields() order
TAIL_SUMS_ATTR = "tail_checksums"  # root attribute [columns, 2]: the last, partly filled block's checksums
BLOCK_ROWS_ATTR = "checksum_block_rows"
HEADER_ATTR = "header_sha256"  # root attribute: see header_digest
ROOT_ATTRS = ("format", "schema_version", "metadata", "num_tokens", "status", TAIL_SUMS_ATTR, BLOCK_ROWS_ATTR,
              HEADER_ATTR)


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
        self, path: Path, metadata: TraceMetadata, compression: str = DEFAULT_COMPRESSION,
        append: bool = False
    ):
        self.path = path
        self.metadata = metadata
        self.fields = metadata.stored_fields()
        if append:
            self.file = h5py.File(path, "r+")
            self.num_tokens = int(self.file.attrs["num_tokens"])
            for name in self.fields:  # drop rows past the last committed batch
                self.file[name].resize(self.num_tokens, axis=0)
            self.checked = BLOCK_SUMS in self.file  # a file of format 1.0 is continued without checksums
            metadata.format_minor = FORMAT_MINOR if self.checked else 0
            self.sums = BlockSums(self.fields, CHECK_ROWS)
            if self.checked:
                full = self.num_tokens // CHECK_ROWS
                self.file[BLOCK_SUMS].resize(full, axis=0)
                self.sums.resume(self.num_tokens, {n: self.file[n][full * CHECK_ROWS:self.num_tokens]
                                                   for n in self.fields})
            return
        filters = dataset_filters(compression)
        self.file = h5py.File(path, "w")
        self.num_tokens = 0
        self.checked = True
        self.sums = BlockSums(self.fields, CHECK_ROWS)
        metadata.format_minor = FORMAT_MINOR
        attrs = self.file.attrs
        attrs["format"] = FORMAT_NAME
        attrs["schema_version"] = SCHEMA_VERSION
        attrs["metadata"] = metadata.to_json()
        attrs["num_tokens"] = 0
        attrs["status"] = "partial"
        attrs[BLOCK_ROWS_ATTR] = CHECK_ROWS
        for name in self.fields:
            shape = metadata.field_shape(name)
            self.file.create_dataset(
                name,
                shape=(0, *shape),
                maxshape=(None, *shape),
                dtype=metadata.field_dtype(name),
                chunks=(CHUNK_TOKENS, *shape),
                **filters,
            )
        self.file.create_dataset(BLOCK_SUMS, shape=(0, len(self.fields), 2),
                                 maxshape=(None, len(self.fields), 2), dtype=np.uint64,
                                 chunks=(256, len(self.fields), 2))
        self._commit_header()
        self.file.flush()

    def append(self, chunk: TraceChunk) -> None:
        n = chunk.num_tokens
        start, stop = self.num_tokens, self.num_tokens + n
        for name in self.fields:
            ds = self.file[name]
            ds.resize(stop, axis=0)
            ds[start:stop] = getattr(chunk, name)
        if self.checked:
            full = self.sums.add(chunk)
            if full:
                ds = self.file[BLOCK_SUMS]
                first = ds.shape[0]
                ds.resize(first + len(full), axis=0)
                ds[first:] = np.array(full, dtype=np.uint64)
        # The row count (with the tail block's checksum and the header digest) is committed last: a reader
        # never trusts rows past it.
        self.num_tokens = stop
        self.file.attrs["num_tokens"] = stop
        if self.checked:
            self._commit_header()
        self.file.flush()

    def _commit_header(self) -> None:
        attrs = self.file.attrs
        attrs[TAIL_SUMS_ATTR] = np.array(self.sums.tail_sums(), dtype=np.uint64).reshape(len(self.fields), 2)
        attrs[HEADER_ATTR] = header_digest(
            str(attrs["metadata"]), str(attrs["status"]), int(attrs["num_tokens"]), CHECK_ROWS
        )

    def close(self, complete: bool) -> None:
        self.file.attrs["status"] = "complete" if complete else "partial"
        meta = TraceMetadata.from_json(self.file.attrs["metadata"])
        meta.status = self.file.attrs["status"]
        self.file.attrs["metadata"] = meta.to_json()
        if self.checked:
            self._commit_header()
        self.file.close()


def header_digest(metadata: str, status: str, num_tokens: int, block_rows: int) -> str:
    """SHA-256 over the root attributes a reader trusts (metadata JSON, status, row count, checksum block)."""
    return text_digest(json.dumps([FORMAT_NAME, SCHEMA_VERSION, metadata, status, num_tokens, block_rows]))


def _open_h5(path: Location, absolute: str) -> h5py.File:
    """The file read-only: a local file by its absolute path, a URL through fsspec (h5py reads the file
    object)."""
    try:
        return h5py.File(absolute if isinstance(path, Path) else location.open_binary(absolute), "r")
    except OSError as exc:
        raise InputError(f"{path}: cannot open as HDF5 ({_short(exc)}); the file may be truncated or "
                         "corrupt") from exc


def _probe(path: Location, absolute: str) -> dict:
    """Everything the reader takes from the file's structure, read in the watchdog's helper process (whose
    working directory may differ from the caller's: it opens the absolute path, and names `path` in
    errors)."""
    file = _open_h5(path, absolute)
    with file:
        attrs = {key: file.attrs[key] for key in ROOT_ATTRS if key in file.attrs}
        datasets = {}
        for name in file:
            obj = file.get(name)
            if isinstance(obj, h5py.Dataset):
                datasets[name] = (obj.shape, obj.dtype, obj.chunks)
        sums = None
        if BLOCK_SUMS in datasets and "num_tokens" in attrs:
            shape = datasets[BLOCK_SUMS][0]
            full = int(attrs["num_tokens"]) // max(1, int(attrs.get(BLOCK_ROWS_ATTR, CHECK_ROWS)))
            if len(shape) != 3 or shape[0] < full or shape[2] != 2:  # checked before allocating for it
                raise InputError(f"{path}: {BLOCK_SUMS} has shape {shape}, too small for the declared rows")
            sums = file[BLOCK_SUMS][:full]
    return {"attrs": attrs, "datasets": datasets, "sums": sums}


class Hdf5ShardReader:
    """Reads one HDF5 trace file, trusting only the committed rows, and checking every block's checksum."""

    encoding = "hdf5"

    def __init__(self, path: Location):
        self.path = path
        # a corrupt file may hang libhdf5: never here
        info = run_bounded(_probe, (path, location.portable(path)), str(path))
        attrs, datasets = info["attrs"], info["datasets"]
        if attrs.get("format") != FORMAT_NAME or "metadata" not in attrs:
            raise InputError(f"{path}: HDF5 file is not a moe-trace trace")
        self.file = _open_h5(path, location.portable(path))
        try:
            self._check_structure(attrs, datasets, info["sums"])
        except BaseException:
            self.file.close()
            raise

    def _check_structure(self, attrs: dict, datasets: dict, sums: np.ndarray | None) -> None:
        path = self.path
        self.metadata = TraceMetadata.from_json(attrs["metadata"], str(path))
        self.metadata.status = str(attrs.get("status", "partial"))
        try:
            self.num_tokens = int(attrs["num_tokens"])
        except (KeyError, TypeError, ValueError) as exc:
            raise InputError(f"{path}: the num_tokens attribute is missing or not a number") from exc
        fields = self.metadata.stored_fields()
        marks = [k for k in (HEADER_ATTR, TAIL_SUMS_ATTR, BLOCK_ROWS_ATTR) if k in attrs] + (
            [BLOCK_SUMS] if BLOCK_SUMS in datasets else [])
        self.checked = self.metadata.format_minor >= 1 or bool(marks)
        if self.checked:
            if len(marks) < 4:
                raise InputError(f"{path}: block checksums are damaged or missing (found only "
                                 f"{', '.join(marks) or 'none'})")
            digest = header_digest(str(attrs["metadata"]), str(attrs.get("status")), self.num_tokens,
                                   int(attrs[BLOCK_ROWS_ATTR]))
            if digest != str(attrs[HEADER_ATTR]) or int(attrs[BLOCK_ROWS_ATTR]) != CHECK_ROWS:
                raise InputError(f"{path}: checksum mismatch in the root attributes (metadata, status, "
                                 "num_tokens); the file is corrupt")
            tail = np.asarray(attrs[TAIL_SUMS_ATTR])
            if sums is None or sums.shape[1:] != (len(fields), 2) or tail.shape != (len(fields), 2):
                raise InputError(f"{path}: block checksums have the wrong shape for {len(fields)} columns")
            self.block_sums, self.tail_sums = sums, tail
        if self.num_tokens < 0:
            raise InputError(f"{path}: num_tokens {self.num_tokens} is negative")
        for name in fields:
            if name not in datasets:
                raise InputError(f"{path}: column {name} is missing")
            shape, dtype, _ = datasets[name]
            want = self.metadata.field_shape(name)
            if shape[1:] != want or shape[0] < self.num_tokens:
                raise InputError(f"{path}: column {name} has shape {shape}, expected ({self.num_tokens}, "
                                 f"*{want})")
            if dtype != self.metadata.field_dtype(name):
                raise InputError(f"{path}: column {name} is {dtype}, expected "
                                 f"{self.metadata.field_dtype(name)}")

    def read(self, names: list[str], start: int, stop: int) -> TraceChunk:
        stop = min(stop, self.num_tokens)
        # Checksums cover whole blocks: read the blocks that hold [start, stop) and cut the rows out.
        lo = start - start % CHECK_ROWS if self.checked else start
        hi = min(self.num_tokens, -(-stop // CHECK_ROWS) * CHECK_ROWS) if self.checked else stop
        out = {}
        for name in names:
            try:
                with bounded_read(str(self.path)):
                    values = self.file[name][lo:hi]
            except (OSError, ValueError, KeyError, RuntimeError, TypeError) as exc:  # a damaged chunk
                raise InputError(f"{self.path}: cannot read {name} rows {start}..{stop} "
                                 f"({_short(exc)})") from exc
            if self.checked:
                self._verify(name, values, lo)
            out[name] = values[start - lo:stop - lo]
        return TraceChunk(**out)

    def _verify(self, name: str, values: np.ndarray, row0: int) -> None:
        """Each block of the rows read from row0 (a block boundary) against its stored checksum, the full
        blocks hashed in one kernel call."""
        column = self.metadata.stored_fields().index(name)
        for i, got in enumerate(block_checksums(values, CHECK_ROWS)):
            block = row0 // CHECK_ROWS + i
            want = self.block_sums[block, column] if block < len(self.block_sums) else self.tail_sums[column]
            if got != (int(want[0]), int(want[1])):
                first = block * CHECK_ROWS
                raise InputError(f"{self.path}: checksum mismatch in {name} block {block} (rows {first}.."
                                 f"{min(first + CHECK_ROWS, self.num_tokens)}); the file is corrupt")

    def iter_blocks(self, names: list[str], block_tokens: int, start: int = 0, stop: int | None = None):
        # Read whole HDF5 chunks at a time: partial-chunk reads decompress the same chunk twice.
        chunk_rows = max((self.file[n].chunks or (CHUNK_TOKENS,))[0]
                         for n in names) if names else CHUNK_TOKENS
        if self.checked:
            chunk_rows = CHECK_ROWS
        step = max(chunk_rows, (block_tokens // chunk_rows) * chunk_rows)
        stop = self.num_tokens if stop is None else min(stop, self.num_tokens)
        for lo in range(start - start % step, stop, step):
            yield self.read(names, max(lo, start), min(lo + step, stop))

    def close(self) -> None:
        self.file.close()


def _short(exc: BaseException) -> str:
    return str(exc).splitlines()[0] if str(exc) else type(exc).__name__


def is_hdf5(head: bytes) -> bool:
    return head.startswith(HDF5_MAGIC)
