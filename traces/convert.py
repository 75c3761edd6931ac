"""Lossless conversion between the HDF5 and Arrow encodings (the output's extension picks the encoding).

Every column and every metadata key is copied as it is (provenance included: the trace describes the
recording, not the conversion). The output is written as `<out>.partial` and renamed when complete; on failure
the partial file is removed, so the output name holds a whole trace or nothing.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence
from pathlib import Path

from traces.errors import InputError
from traces.reader import DEFAULT_CHUNK_TOKENS, expand_paths, open_trace
from traces.schema import TraceMetadata
from traces.writer import encoding_for, open_writer, partial_path


def convert(
    src: str | Path | Sequence[str | Path],
    dst: str | Path,
    *,
    force: bool = False,
    compression: str | None = None,
    chunk_tokens: int = DEFAULT_CHUNK_TOKENS,
    on_chunk: Callable[[int], None] | None = None,
) -> Path:
    """Copy a trace (one file or shards, merged) into dst. Returns dst."""
    dst = Path(dst)
    encoding_for(dst)  # unsupported extension: fail before reading anything
    sources = expand_paths(src)
    if any(isinstance(p, Path) and p.exists() and dst.exists() and p.resolve() == dst.resolve()
           for p in sources):
        raise InputError(f"{dst}: output is the same file as the input")
    with open_trace(sources) as trace:
        if not trace.complete:
            raise InputError(
                f"{trace.paths[0]}: trace is partial; finish it first (moe-rec record --resume) or read it "
                "as it is"
            )
        meta = TraceMetadata.from_dict(trace.metadata.to_dict())
        names = meta.stored_fields()
        writer = open_writer(dst, meta, force=force, compression=compression)
        try:
            for chunk in trace.iter_chunks(names, chunk_tokens):
                writer.append(chunk)
                if on_chunk is not None:
                    on_chunk(chunk.num_tokens)
        except BaseException:
            writer.close(complete=False)
            with contextlib.suppress(OSError):
                partial_path(dst).unlink()
            raise
        return writer.close(complete=True)
