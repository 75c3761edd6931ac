"""Capture router outputs with no host synchronisation inside the forward pass.

During a forward pass each router's forward hook only keeps references to its outputs (no kernel, no copy).
After the pass, `end_pass` concatenates the L layers into preallocated device buffers (one kernel per field, with
the dtype conversion fused in), starts non-blocking copies into pinned host memory and records a CUDA event. A
background thread (`TraceSink`) waits for the event, drops padding rows and appends whole batches to the trace;
a byte budget on the work in flight gives back-pressure, so memory stays bounded.

Shape legend: B batch rows, S tokens per row in this pass, T = B * S rows (padding included), L MoE layers,
K top-k, E experts.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from recorder.routers import RouterLayout
from traces.chunk import TraceChunk
from traces.writer import TraceWriter

RouterRead = tuple[torch.Tensor, torch.Tensor, torch.Tensor]  # ids [T, K], weights [T, K], first output [T, E]


@dataclass
class PassTokens:
    """Who the T = B * S rows of one forward pass are (row r = b * S + s). Tensors may live on the device."""

    seq_id: np.ndarray  # [B] prompt index of each batch row
    position: torch.Tensor  # [B, S]
    token_id: torch.Tensor | None  # [B, S]
    valid: torch.Tensor  # [B, S] bool: False for padding and finished sequences
    phase: int
    step: int


@dataclass
class HostPass:
    """One pass's routing in host memory; the copies may still be in flight until `event` completes."""

    ids: torch.Tensor  # [L, T, K]
    weights: torch.Tensor | None  # [L, T, K]
    logits: torch.Tensor | None  # [L, T, E]
    tokens: PassTokens  # with host tensors
    event: Any  # torch.cuda.Event or None
    nbytes: int

    def to_chunk(self, with_token_ids: bool, id_dtype: np.dtype, weights_dtype: np.dtype) -> TraceChunk:
        if self.event is not None:
            self.event.synchronize()
        t = self.tokens
        seq_len = t.valid.shape[1]
        rows = np.flatnonzero(t.valid.numpy().reshape(-1))  # valid: bool or 0/1 integers

        def per_layer(x: torch.Tensor, dtype: np.dtype) -> np.ndarray:
            # [L, T, X] -> [T_valid, L, X]
            return np.ascontiguousarray(x.numpy()[:, rows].transpose(1, 0, 2)).astype(dtype, copy=False)

        chunk = TraceChunk(
            seq_id=np.repeat(t.seq_id.astype(np.int32), seq_len)[rows],
            position=t.position.numpy().reshape(-1)[rows].astype(np.int32),
            phase=np.full(rows.size, t.phase, dtype=np.uint8),
            step=np.full(rows.size, t.step, dtype=np.int32),
            expert_ids=per_layer(self.ids, id_dtype),
        )
        if with_token_ids and t.token_id is not None:
            chunk.token_id = t.token_id.numpy().reshape(-1)[rows].astype(np.int32)
        if self.weights is not None:
            chunk.expert_weights = per_layer(self.weights, weights_dtype)
        if self.logits is not None:
            chunk.router_logits = per_layer(self.logits, np.dtype(np.float16))
        return chunk


class RoutingCapture:
    """Forward hooks on every router of `layout`; `end_pass` moves one pass's routing to the host."""

    def __init__(
        self,
        layout: RouterLayout,
        *,
        save_weights: bool = True,
        save_logits: bool = False,
        weights_dtype: torch.dtype = torch.float16,
    ):
        self.layout = layout
        self.save_weights = save_weights
        self.save_logits = save_logits
        self.weights_dtype = weights_dtype
        # uint8 ids on the device when they fit; int32 otherwise (torch has few uint16 kernels).
        self.id_dtype = torch.uint8 if layout.num_experts <= 256 else torch.int32
        self.enabled = True
        self._pending: list[RouterRead | None] = [None] * layout.num_layers
        self._buffers: dict[str, torch.Tensor] = {}
        self._handles: list[Any] = []
        self.attach()

    def attach(self) -> None:
        """Register the router hooks (done by the constructor; again after remove())."""
        if not self._handles:
            self._handles = [
                site.module.register_forward_hook(self._make_hook(slot)) for slot, site in enumerate(self.layout.sites)
            ]

    # -- inside the forward pass: references only -------------------------------------------------------------
    def _make_hook(self, slot: int) -> Callable[..., None]:
        def hook(module: torch.nn.Module, args: Any, output: Any) -> None:
            if self.enabled:
                self._pending[slot] = self._read(output)

        return hook

    def _read(self, output: Any) -> RouterRead:
        lay = self.layout
        if lay.convention == "3-tuple":
            first, weights, ids = output
        elif lay.convention == "2-tuple":
            first, ids = output
            probs = first if lay.first_output == "probabilities" else F.softmax(first.float(), dim=-1)
            weights = probs.reshape(-1, probs.shape[-1]).gather(-1, ids.reshape(-1, ids.shape[-1]))
            if lay.norm_topk_prob and not lay.dense_scores:
                weights = weights / weights.sum(-1, keepdim=True)
        else:  # "logits": an nn.Linear gate; redo the block's softmax top-k (transformers 4.x)
            first = output
            probs = F.softmax(first.float(), dim=-1)
            weights, ids = torch.topk(probs, lay.top_k, dim=-1)
            if lay.norm_topk_prob:
                weights = weights / weights.sum(-1, keepdim=True)
            weights = weights.to(first.dtype)
        k = lay.top_k
        return ids.reshape(-1, k), weights.reshape(-1, k), first.reshape(-1, first.shape[-1])

    # -- after the forward pass ------------------------------------------------------------------------------
    def clear(self) -> None:
        self._pending = [None] * self.layout.num_layers

    @property
    def has_pending(self) -> bool:
        return any(p is not None for p in self._pending)

    def _device_buffer(self, name: str, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        numel = int(np.prod(shape))
        buf = self._buffers.get(name)
        if buf is None or buf.numel() < numel or buf.device != device:
            # Grow with headroom; a copy still reading the old buffer is ordered before any reuse on the stream.
            buf = torch.empty(max(numel, 2 * (buf.numel() if buf is not None else 0)), dtype=dtype, device=device)
            self._buffers[name] = buf
        return buf[:numel].view(shape)

    def _to_host(self, name: str, parts: list[torch.Tensor], dtype: torch.dtype) -> torch.Tensor:
        """Concatenate L per-layer tensors [T, X] into a device buffer, then copy it to (pinned) host memory."""
        first = parts[0]
        shape = (len(parts), *first.shape)
        on_cuda = first.device.type == "cuda"
        host = torch.empty(shape, dtype=dtype, pin_memory=on_cuda)
        if on_cuda:
            dev = self._device_buffer(name, shape, dtype, first.device)
            torch.stack(parts, out=dev)
            host.copy_(dev, non_blocking=True)
        else:
            torch.stack(parts, out=host)
        return host

    def end_pass(self, tokens: PassTokens) -> HostPass:
        """Start moving the pass just run to the host; never waits for the device."""
        pending = self._pending
        missing = [self.layout.sites[i].name for i, p in enumerate(pending) if p is None]
        if missing:
            raise RuntimeError(f"routers did not run in this forward pass: {', '.join(missing[:3])}")
        reads = [p for p in pending if p is not None]
        ids = self._to_host("ids", [r[0] for r in reads], self.id_dtype)
        weights = self._to_host("weights", [r[1] for r in reads], self.weights_dtype) if self.save_weights else None
        logits = self._to_host("logits", [r[2] for r in reads], torch.float16) if self.save_logits else None
        on_cuda = reads[0][0].device.type == "cuda"
        host_tokens = _tokens_to_host(tokens)
        event = None
        if on_cuda:
            event = torch.cuda.Event()
            event.record()
        self.clear()
        nbytes = sum(x.numel() * x.element_size() for x in (ids, weights, logits) if x is not None)
        return HostPass(ids, weights, logits, host_tokens, event, nbytes)

    def remove(self) -> None:
        """Detach every hook; the device buffers are kept for a later attach()."""
        for handle in self._handles:
            handle.remove()
        self._handles = []
        self.clear()


def _tokens_to_host(tokens: PassTokens) -> PassTokens:
    """Position, token id and validity in one stacked [3, B, S] int64 copy (one kernel, one transfer)."""
    parts = [tokens.position, tokens.token_id if tokens.token_id is not None else tokens.position, tokens.valid]
    if any(p.device.type == "cuda" for p in parts):
        device = next(p.device for p in parts if p.device.type == "cuda")
        stacked = torch.stack([p.to(device=device, dtype=torch.int64, non_blocking=True) for p in parts])
        host = torch.empty(stacked.shape, dtype=torch.int64, pin_memory=True)
        host.copy_(stacked, non_blocking=True)
    else:
        host = torch.stack([p.to(torch.int64) for p in parts])
    return PassTokens(
        seq_id=tokens.seq_id,
        position=host[0],
        token_id=host[1] if tokens.token_id is not None else None,
        valid=host[2],  # 0/1
        phase=tokens.phase,
        step=tokens.step,
    )


class TraceSink:
    """Background writer: turns batches of HostPass into trace chunks, in order, with bounded memory.

    `submit` blocks while more than `max_bytes` of host buffers wait to be written (back-pressure). Batches are
    coalesced and appended together once `flush_bytes` have gathered or `flush_seconds` have passed: every append
    and flush of the file costs the writer thread time under Python's GIL, which a CPU-bound decode loop in the
    main thread would otherwise feel. Appends happen only at batch boundaries, so an interrupted trace holds whole
    batches; close() writes whatever is pending. With `writer=None` the chunks are kept in `self.chunks`.
    """

    def __init__(
        self,
        writer: TraceWriter | None,
        *,
        with_token_ids: bool,
        id_dtype: np.dtype,
        weights_dtype: np.dtype,
        max_bytes: int = 1 << 30,
        flush_bytes: int = 16 << 20,
        flush_seconds: float = 2.0,
        on_written: Callable[[int, int], None] | None = None,
    ):
        self.writer = writer
        self.with_token_ids = with_token_ids
        self.id_dtype = id_dtype
        self.weights_dtype = weights_dtype
        self.max_bytes = max_bytes
        self.flush_bytes = flush_bytes
        self.flush_seconds = flush_seconds
        self.on_written = on_written
        self.chunks: list[TraceChunk] = []
        self.tokens_written = 0
        self.batches_written = 0
        self._queue: queue.Queue[tuple[list[HostPass], int] | None] = queue.Queue()
        self._pending: list[tuple[list[HostPass], int]] = []
        self._pending_bytes = 0
        self._last_flush = time.monotonic()
        self._in_flight = 0
        self._cond = threading.Condition()
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="moe-trace-writer", daemon=True)
        self._thread.start()

    def submit(self, passes: list[HostPass], num_sequences: int) -> None:
        """Hand over one whole batch (all its passes); blocks while too much waits to be written."""
        nbytes = sum(p.nbytes for p in passes)
        with self._cond:
            while self._in_flight > 0 and self._in_flight + nbytes > self.max_bytes and self._error is None:
                self._cond.wait()
            self._raise_if_failed()
            self._in_flight += nbytes
        self._queue.put((passes, num_sequences))

    def _run(self) -> None:
        while True:
            item = self._queue.get()
            if item is not None:
                self._pending.append(item)
                self._pending_bytes += sum(p.nbytes for p in item[0])
            due = (item is None or self._pending_bytes >= self.flush_bytes
                   or time.monotonic() - self._last_flush >= self.flush_seconds)
            if due and self._pending:
                batch, self._pending, freed = self._pending, [], self._pending_bytes
                self._pending_bytes = 0
                try:
                    if self._error is None:
                        self._write(batch)
                except BaseException as exc:  # reported to the main thread at its next submit/close
                    self._error = exc
                finally:
                    self._last_flush = time.monotonic()
                    with self._cond:
                        self._in_flight -= freed
                        self._cond.notify_all()
            if item is None:
                return

    def _write(self, batches: list[tuple[list[HostPass], int]]) -> None:
        parts = [p.to_chunk(self.with_token_ids, self.id_dtype, self.weights_dtype) for ps, _ in batches for p in ps]
        chunk = TraceChunk.concat(parts)
        if self.writer is not None:
            self.writer.append(chunk)
        else:
            self.chunks.append(chunk)
        self.tokens_written += chunk.num_tokens
        self.batches_written += len(batches)
        if self.on_written is not None:
            self.on_written(sum(n for _, n in batches), chunk.num_tokens)

    def _raise_if_failed(self) -> None:
        if self._error is not None:
            raise self._error

    def close(self) -> None:
        """Write everything submitted, stop the thread, and re-raise a writer error."""
        if self._thread.is_alive():
            self._queue.put(None)
            self._thread.join()
        self._raise_if_failed()
