"""Trace format v1: schema, writer and reader (the contract between recorder/ and simulator/)."""

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
