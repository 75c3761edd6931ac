"""Trace format v1: schema, writer and reader (the contract between recorder/ and simulator/)."""

import os as _os
from pathlib import Path as _Path

# Numba's compiled kernels are cached in the user's cache directory, not beside the installed sources (which
# may be read-only or shared); every package imports traces first, so this runs before Numba is imported. A
# NUMBA_CACHE_DIR the user set wins.
_os.environ.setdefault("NUMBA_CACHE_DIR", str(
    _Path(_os.environ.get("XDG_CACHE_HOME") or _Path.home() / ".cache") / "moe-trace" / "numba"))

from traces.chunk import TraceChunk
from traces.errors import InputError
from traces.reader import DEFAULT_CHUNK_TOKENS, Trace, open_trace
from traces.schema import (
    PHASE_DECODE,
    PHASE_NAMES,
    PHASE_PREFILL,
    SCHEMA_VERSION,
    TraceMetadata,
    expert_id_dtype,
)
from traces.writer import TraceWriter, encoding_for, open_writer, partial_path, write_trace

__all__ = [
    "DEFAULT_CHUNK_TOKENS",
    "PHASE_DECODE",
    "PHASE_NAMES",
    "PHASE_PREFILL",
    "SCHEMA_VERSION",
    "InputError",
    "Trace",
    "TraceChunk",
    "TraceMetadata",
    "TraceWriter",
    "encoding_for",
    "expert_id_dtype",
    "open_trace",
    "open_writer",
    "partial_path",
    "write_trace",
]
