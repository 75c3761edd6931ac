"""Older library releases: the Arrow reader counts rows without RecordBatchFileReader.count_rows."""

from __future__ import annotations

import numpy as np
import pyarrow as pa

from traces import TraceChunk, TraceMetadata, write_trace
from traces.arrow_format import _count_rows


class _OldReader:
    """A file reader as older pyarrow releases offer it: no count_rows."""

    def __init__(self, reader: pa.ipc.RecordBatchFileReader):
        self.schema = reader.schema


def test_row_count_without_count_rows(tmp_path) -> None:
    meta = TraceMetadata(model_id="m", model_type="olmoe", num_hidden_layers=1, moe_layers=[0],
                         moe_module_names=["layers.0.mlp.gate"], num_experts=4, top_k=2, hidden_size=8,
                         expert_intermediate_size=4)
    n = 1234
    chunk = TraceChunk(
        seq_id=np.zeros(n, np.int32), position=np.arange(n, dtype=np.int32), token_id=np.zeros(n, np.int32),
        phase=np.zeros(n, np.uint8), step=np.zeros(n, np.int32),
        expert_ids=np.tile(np.array([[[0, 1]]], np.uint8), (n, 1, 1)),
        expert_weights=np.ones((n, 1, 2), np.float16),
    )
    path = tmp_path / "t.arrow"
    write_trace(path, meta, chunk)
    with pa.OSFile(str(path)) as source:
        reader = pa.ipc.open_file(source)
        assert _count_rows(source, _OldReader(reader)) == n  # type: ignore[arg-type]
