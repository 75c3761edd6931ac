"""Hand-made traces for the traces/ tests: valid random rows with known content."""

from __future__ import annotations

import numpy as np

from traces import TraceChunk, TraceMetadata
from traces.presets import preset_metadata


def make_meta(model: str = "mixtral-8x7b", **overrides: object) -> TraceMetadata:
    fields: dict = {"created_at": "2026-01-01T00:00:00+00:00", "tool_version": "test", "source": "synthetic"}
    fields.update(overrides)
    return preset_metadata(model, **fields)


def make_chunk(meta: TraceMetadata, num_tokens: int, seed: int = 0) -> TraceChunk:
    """Random but valid rows: distinct experts per row, weights in (0, 1), logits when the metadata asks."""
    rng = np.random.default_rng(seed)
    t, layers, k, e = num_tokens, meta.num_moe_layers, meta.top_k, meta.num_experts
    ids = np.argsort(rng.random((t, layers, e)), axis=-1)[..., :k].astype(meta.id_dtype)  # [T, L, K]
    return TraceChunk(
        seq_id=(np.arange(t) // 100).astype(np.int32),
        position=(np.arange(t) % 100).astype(np.int32),
        token_id=rng.integers(0, max(1, meta.vocab_size), t).astype(np.int32) if meta.has_token_ids else None,
        phase=(np.arange(t) % 100 >= 80).astype(np.uint8),
        step=np.arange(t, dtype=np.int32),
        expert_ids=ids,
        expert_weights=rng.random((t, layers, k)).astype(meta.weights_dtype) if meta.has_weights else None,
        router_logits=rng.standard_normal((t, layers, e)).astype(np.float16) if meta.has_logits else None,
    )


def assert_same(a: TraceChunk, b: TraceChunk) -> None:
    assert a.present().keys() == b.present().keys()
    for name, value in a.present().items():
        other = getattr(b, name)
        assert other.dtype == value.dtype, name
        np.testing.assert_array_equal(other, value, err_msg=name)
