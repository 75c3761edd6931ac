"""Blocks of passes on their way from the device to the trace: one byte buffer per block, fields at fixed
offsets.

`RoutingCapture` (capture.py) fills a `HostBlock`; `TraceSink` (sink.py) copies it out of pinned memory as a
`RawBlock` and converts blocks into trace rows with `blocks_to_chunk`.

Shape legend: N passes in a block, B batch rows, S tokens per row in a pass, T = B * S rows (padding
included), L MoE layers, X the last axis of a field (K top-k for ids and weights, E experts for logits).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from traces.chunk import TraceChunk

# One block of passes travels as one byte buffer: fields at 8-byte aligned offsets. name -> (offset, dtype,
# shape)
Packing = dict[str, tuple[int, torch.dtype, tuple[int, ...]]]


def packing_of(fields: list[tuple[str, torch.dtype, tuple[int, ...]]]) -> tuple[Packing, int]:
    out: Packing = {}
    offset = 0
    for name, dtype, shape in fields:
        out[name] = (offset, dtype, shape)
        nbytes = int(np.prod(shape)) * torch.empty((), dtype=dtype).element_size()
        offset += (nbytes + 7) // 8 * 8
    return out, offset


_NP_DTYPES = {torch.uint8: np.uint8, torch.int32: np.int32, torch.int64: np.int64, torch.float16: np.float16,
              torch.float32: np.float32, torch.bool: np.bool_}


@dataclass
class BlockInfo:
    """Who the N passes of a block are: one entry per pass."""

    seq_ids: list[np.ndarray]  # N x [B]
    phases: list[int]
    steps: list[int]
    has_token_ids: bool


@dataclass
class HostBlock:
    """N passes of one shape in one host byte buffer (pinned on CUDA).

    Until `start()` runs (at once, or in the writer thread when the capture has `copy_in_writer`) the block
    holds `launch`, which keeps the window's device tensors referenced, and no data. After it, the copy into
    `data` may still be in flight until `event` completes; only the writer thread waits for it.
    Fields: tokens [N, 2, B, S] (position, token id), valid [N, B, S], ids, weights, logits [N, T, L, X].
    """

    packing: Packing
    info: BlockInfo
    nbytes: int
    # starts the copy: (host bytes, event); until started
    launch: Callable[[], tuple[torch.Tensor, Any]] | None = None
    data: torch.Tensor | None = None  # uint8 [nbytes]
    event: Any = None  # torch.cuda.Event or None

    @property
    def num_passes(self) -> int:
        return len(self.info.steps)

    def start(self) -> None:
        """Launch the window's gather kernels and its copy to the host (never waits); a no-op once started."""
        if self.launch is not None:
            launch, self.launch = self.launch, None
            self.data, self.event = launch()

    def ready(self) -> bool:
        """True once the copy to the host has finished (never blocks)."""
        self.start()
        return self.event is None or bool(self.event.query())

    def release(self) -> RawBlock:
        """A plain copy of the bytes, so the pinned buffer goes back to the allocator now (waits for the
        copy)."""
        self.start()
        assert self.data is not None
        if self.event is not None:
            self.event.synchronize()  # with the GIL released
        return RawBlock(self.data.numpy().copy(), self.packing, self.info)

    def field(self, name: str) -> np.ndarray:
        return self.release().field(name)

    def to_chunk(self, with_token_ids: bool, id_dtype: np.dtype, weights_dtype: np.dtype) -> TraceChunk:
        return blocks_to_chunk([self.release()], with_token_ids, id_dtype, weights_dtype)


@dataclass
class RawBlock:
    """A HostBlock copied out of pinned memory, waiting to be converted."""

    raw: np.ndarray  # uint8 [nbytes]
    packing: Packing
    info: BlockInfo

    def field(self, name: str) -> np.ndarray:
        """Field `name` as a view of the bytes (shapes as in HostBlock)."""
        offset, dtype, shape = self.packing[name]
        np_dtype = np.dtype(_NP_DTYPES[dtype])
        count = int(np.prod(shape))
        return self.raw[offset: offset + count * np_dtype.itemsize].view(np_dtype).reshape(shape)


def blocks_to_chunk(blocks: list[RawBlock], with_token_ids: bool, id_dtype: np.dtype,
                    weights_dtype: np.dtype) -> TraceChunk:
    """Trace rows of consecutive blocks, in order, padding dropped."""
    return TraceChunk.concat([_convert(b, with_token_ids, id_dtype, weights_dtype) for b in blocks])


def _convert(block: RawBlock, with_token_ids: bool, id_dtype: np.dtype,
             weights_dtype: np.dtype) -> TraceChunk:
    """One block's rows, vectorised over its N passes (one NumPy call per column, not per pass)."""
    info = block.info
    tokens = block.field("tokens")  # [N, 2, B, S]
    n, _, b, s = tokens.shape
    valid = block.field("valid").reshape(-1)  # [N * T]
    rows: slice | np.ndarray = slice(None) if bool(valid.all()) else np.flatnonzero(valid)
    per_pass = b * s

    def per_token(name: str, dtype: np.dtype) -> np.ndarray:
        x = block.field(name)  # [N, T, L, X]
        return x.reshape(n * per_pass, *x.shape[2:])[rows].astype(dtype, copy=False)

    seq = np.repeat(np.stack(info.seq_ids).astype(np.int32), s, axis=1).reshape(-1)  # [N * T]
    chunk = TraceChunk(
        seq_id=seq[rows],
        position=tokens[:, 0].reshape(-1)[rows].astype(np.int32),
        phase=np.repeat(np.asarray(info.phases, dtype=np.uint8), per_pass)[rows],
        step=np.repeat(np.asarray(info.steps, dtype=np.int32), per_pass)[rows],
        expert_ids=per_token("ids", id_dtype),
    )
    if with_token_ids and info.has_token_ids:
        chunk.token_id = tokens[:, 1].reshape(-1)[rows].astype(np.int32)
    if "weights" in block.packing:
        chunk.expert_weights = per_token("weights", weights_dtype)
    if "logits" in block.packing:
        chunk.router_logits = per_token("logits", np.dtype(np.float16))
    return chunk
