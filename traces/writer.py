"""open_writer(): append batches to a trace, crash-safely.

The writer works on `<final>.partial` and renames it to the final name only when closed cleanly, so the final
name holds either nothing or a complete trace. Completed batches in a `.partial` file always read back (HDF5
flushes and commits a row count after each batch; Arrow batches are recovered from the IPC stream), which is
what `moe-rec record --resume` continues from.
"""

from __future__ import annotations

import os
from pathlib import Path
from types import TracebackType
from typing import Protocol

from traces.chunk import TraceChunk
from traces.errors import InputError
from traces.schema import TraceMetadata, stamp_provenance

HDF5_SUFFIXES = (".h5", ".hdf5")
ARROW_SUFFIXES = (".arrow", ".feather", ".ipc")


def encoding_for(path: Path) -> str:
    """'hdf5' or 'arrow', by the file's extension."""
    suffix = path.suffix.lower()
    if suffix in HDF5_SUFFIXES:
        return "hdf5"
    if suffix in ARROW_SUFFIXES:
        return "arrow"
    raise InputError(
        f"{path}: unsupported trace extension {suffix or '(none)'!r}; use one of "
        + ", ".join(HDF5_SUFFIXES + ARROW_SUFFIXES)
    )


def make_parent_dir(path: Path) -> None:
    """Create the directory an output file goes into; failure is an InputError naming the file."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise InputError(f"{path}: cannot create directory {path.parent} ({exc.strerror})") from exc


def write_text_atomic(path: str | Path, text: str, *, force: bool = False) -> Path:
    """Write a small text output (JSON, YAML) under a temporary name, then rename: never half a file."""
    p = Path(path)
    if p.exists() and not force:
        raise InputError(f"{p}: already exists (pass --force to overwrite)")
    make_parent_dir(p)
    tmp = partial_path(p)
    tmp.write_text(text)
    os.replace(tmp, p)
    return p


def partial_path(path: Path) -> Path:
    return path.with_name(path.name + ".partial")


class _Backend(Protocol):
    num_tokens: int

    def append(self, chunk: TraceChunk) -> None: ...
    def close(self, complete: bool) -> None: ...


class TraceWriter:
    """Writes a trace batch by batch. Use as a context manager: an exception leaves a readable `.partial`
    file.

    >>> with open_writer("trace.h5", meta) as w:
    ...     w.append(chunk)
    """

    def __init__(self, path: Path, metadata: TraceMetadata, backend: _Backend):
        self.path = path
        self.partial = partial_path(path)
        self.metadata = metadata
        self._backend = backend
        self._closed = False

    @property
    def num_tokens(self) -> int:
        return self._backend.num_tokens

    def append(self, chunk: TraceChunk) -> None:
        n = chunk.num_tokens
        for name in self.metadata.stored_fields():
            value = getattr(chunk, name)
            want = (n, *self.metadata.field_shape(name))
            if value is None:
                raise ValueError(f"batch is missing column {name}")
            if value.shape != want:
                raise ValueError(f"column {name} has shape {value.shape}, expected {want}")
        if n:
            self._backend.append(chunk)

    def close(self, complete: bool = True) -> Path:
        """Finish the file. Returns where it now lies: the final name when complete, else the `.partial`
        name."""
        if self._closed:
            return self.path if complete else self.partial
        self._closed = True
        self._backend.close(complete)
        if complete:
            os.replace(self.partial, self.path)
            return self.path
        return self.partial

    def __enter__(self) -> TraceWriter:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close(complete=exc_type is None)


def open_writer(
    path: str | Path,
    metadata: TraceMetadata,
    *,
    force: bool = False,
    resume: bool = False,
    compression: str | None = None,
) -> TraceWriter:
    """Open a trace for writing; the encoding follows the extension (.h5/.hdf5 or .arrow/.feather/.ipc).

    force: replace an existing trace (or leftover .partial) at this name.
    resume: continue a `.partial` file left by an interrupted writer (its rows are kept).
    An empty `created_at` or `tool_version` is filled in (now, this moe-trace), so the file passes validation.
    """
    from traces.arrow_format import DEFAULT_COMPRESSION as ARROW_DEFAULT
    from traces.arrow_format import ArrowTraceWriter
    from traces.hdf5_format import DEFAULT_COMPRESSION as HDF5_DEFAULT
    from traces.hdf5_format import Hdf5TraceWriter

    path = Path(path)
    encoding = encoding_for(path)
    part = partial_path(path)
    if path.exists() and not force:
        raise InputError(f"{path}: already exists (pass --force to overwrite)")
    make_parent_dir(path)
    stamp_provenance(metadata)
    metadata.status = "partial"
    backend: _Backend
    if resume and part.exists():
        if encoding == "hdf5":
            backend = Hdf5TraceWriter(part, metadata, append=True)
        else:
            backend = _resume_arrow(part, metadata, compression or ARROW_DEFAULT)
        return TraceWriter(path, metadata, backend)
    if part.exists() and not force:
        raise InputError(f"{part}: an interrupted trace is here (pass --resume to continue it or --force to "
                         "start over)")
    if encoding == "hdf5":
        backend = Hdf5TraceWriter(part, metadata, compression=compression or HDF5_DEFAULT)
    else:
        backend = ArrowTraceWriter(part, metadata, compression=compression or ARROW_DEFAULT)
    return TraceWriter(path, metadata, backend)


def _resume_arrow(part: Path, metadata: TraceMetadata, compression: str) -> _Backend:
    """Arrow files cannot be appended in place: copy the recovered batches into a fresh partial file."""
    from traces.arrow_format import ArrowShardReader, ArrowTraceWriter

    old = ArrowShardReader(part)
    tmp = part.with_name(part.name + ".resume")
    backend = ArrowTraceWriter(tmp, metadata, compression=compression)
    try:
        for chunk in old.iter_blocks(old.metadata.stored_fields(), 0):  # streamed: memory stays one batch
            backend.append(chunk)
    finally:
        old.close()
    os.replace(tmp, part)
    backend.path = part
    return backend


def write_trace(path: str | Path, metadata: TraceMetadata, chunk: TraceChunk, *, force: bool = False) -> Path:
    """Write a whole in-memory trace at once (the paired form of open_writer)."""
    with open_writer(path, metadata, force=force) as writer:
        writer.append(chunk)
    return Path(path)
