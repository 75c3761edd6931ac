"""Capture router outputs with no host synchronisation inside the forward pass.

During a forward pass each router's forward hook only keeps a reference to its output (no kernel, no copy).
After the pass, `end_pass` stacks the L layers' ids and weights (and logits) as [T, L, X], the trace's own order,
plus the token columns, into views of one preallocated device byte buffer (a stack kernel and a converting copy per
field), starts one non-blocking copy into pinned host memory and records a CUDA event. A background thread
(`TraceSink`) copies finished passes out of pinned memory, drops padding rows and appends whole batches to the
trace; a byte budget on the work in flight gives back-pressure, so memory stays bounded.

Shape legend: B batch rows, S tokens per row in this pass, T = B * S rows (padding included), L MoE layers,
K top-k, E experts.
"""

from __future__ import annotations

import queue
import threading
import time
from collections import deque
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
    valid: torch.Tensor  # [B, S] bool (or 0/1): False for padding and finished sequences
    phase: int
    step: int


# One pass travels as one byte buffer: fields at 8-byte aligned offsets. name -> (offset, dtype, shape)
Packing = dict[str, tuple[int, torch.dtype, tuple[int, ...]]]


def _packing(fields: list[tuple[str, torch.dtype, tuple[int, ...]]]) -> tuple[Packing, int]:
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
class HostPass:
    """One pass's routing and token columns in one host byte buffer (pinned on CUDA).

    The copy into it may still be in flight until `event` completes; only the writer thread waits for it.
    Fields: ids, weights, logits [T, L, X]; tokens [3, B, S] (position, token id, valid).
    """

    data: torch.Tensor  # uint8 [nbytes]
    packing: Packing
    seq_id: np.ndarray  # [B]
    has_token_ids: bool
    phase: int
    step: int
    event: Any  # torch.cuda.Event or None

    @property
    def nbytes(self) -> int:
        return int(self.data.numel())

    def ready(self) -> bool:
        """True once the copy to the host has finished (never blocks)."""
        return self.event is None or bool(self.event.query())

    def release(self) -> RawPass:
        """A plain copy of the bytes, so the pinned buffer goes back to the allocator now (waits for the copy)."""
        if self.event is not None:
            self.event.synchronize()
        return RawPass(self.data.numpy().copy(), self.packing, self.seq_id, self.has_token_ids, self.phase, self.step)

    def field(self, name: str) -> np.ndarray:
        return self.release().field(name)

    def to_chunk(self, with_token_ids: bool, id_dtype: np.dtype, weights_dtype: np.dtype) -> TraceChunk:
        return passes_to_chunk([self.release()], with_token_ids, id_dtype, weights_dtype)


@dataclass
class RawPass:
    """A HostPass copied out of pinned memory, waiting to be converted with others of its shape."""

    raw: np.ndarray  # uint8 [nbytes]
    packing: Packing
    seq_id: np.ndarray
    has_token_ids: bool
    phase: int
    step: int

    def field(self, name: str) -> np.ndarray:
        """Field `name` as a view of the bytes: tokens [3, B, S]; ids, weights, logits [T, L, X]."""
        offset, dtype, shape = self.packing[name]
        np_dtype = np.dtype(_NP_DTYPES[dtype])
        count = int(np.prod(shape))
        return self.raw[offset: offset + count * np_dtype.itemsize].view(np_dtype).reshape(shape)


def passes_to_chunk(passes: list[RawPass], with_token_ids: bool, id_dtype: np.dtype,
                    weights_dtype: np.dtype) -> TraceChunk:
    """Trace rows of consecutive passes, in order, padding dropped."""
    return TraceChunk.concat([_convert(p, with_token_ids, id_dtype, weights_dtype) for p in passes])


def _convert(p: RawPass, with_token_ids: bool, id_dtype: np.dtype, weights_dtype: np.dtype) -> TraceChunk:
    tokens = p.field("tokens")  # [3, B, S]
    _, b, s = tokens.shape
    valid = tokens[2].reshape(-1)
    rows: slice | np.ndarray = slice(None) if bool(valid.all()) else np.flatnonzero(valid)

    def per_token(name: str, dtype: np.dtype) -> np.ndarray:
        return p.field(name)[rows].astype(dtype, copy=False)  # [T, L, X] rows, already in trace order

    n = b * s if isinstance(rows, slice) else rows.size
    chunk = TraceChunk(
        seq_id=np.repeat(p.seq_id.astype(np.int32), s)[rows],
        position=tokens[0].reshape(-1)[rows].astype(np.int32),
        phase=np.full(n, p.phase, dtype=np.uint8),
        step=np.full(n, p.step, dtype=np.int32),
        expert_ids=per_token("ids", id_dtype),
    )
    if with_token_ids and p.has_token_ids:
        chunk.token_id = tokens[1].reshape(-1)[rows].astype(np.int32)
    if "weights" in p.packing:
        chunk.expert_weights = per_token("weights", weights_dtype)
    if "logits" in p.packing:
        chunk.router_logits = per_token("logits", np.dtype(np.float16))
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
        self._pending: list[Any] = [None] * layout.num_layers
        self._device_bytes: torch.Tensor | None = None
        self._views: dict[tuple, tuple[Packing, int, dict[str, torch.Tensor]]] = {}
        self._staging: dict[tuple, torch.Tensor] = {}  # per-shape concatenation buffers in the router's dtypes
        self._handles: list[Any] = []
        self.attach()

    def attach(self) -> None:
        """Register the router hooks (done by the constructor; again after remove())."""
        if not self._handles:
            self._handles = [
                site.module.register_forward_hook(self._make_hook(slot)) for slot, site in enumerate(self.layout.sites)
            ]

    # -- inside the forward pass: one list store per router, nothing else ----------------------------------------
    def _make_hook(self, slot: int) -> Callable[..., None]:
        pending = self._pending

        def hook(module: torch.nn.Module, args: Any, output: Any) -> None:
            pending[slot] = output

        return hook

    def _read(self, output: Any) -> RouterRead:
        """(ids [T, K], weights [T, K], first output [T, E]) from one router output, by convention."""
        lay = self.layout
        k = lay.top_k
        if lay.convention == "3-tuple":
            first, weights, ids = output
        elif lay.convention == "2-tuple":
            first, ids = output
            probs = first if lay.first_output == "probabilities" else F.softmax(first.float(), dim=-1)
            weights = probs.reshape(-1, probs.shape[-1]).gather(-1, ids.reshape(-1, k))
            if lay.norm_topk_prob and not lay.dense_scores:
                weights = weights / weights.sum(-1, keepdim=True)
        else:  # "logits": an nn.Linear gate; redo the block's softmax top-k (transformers 4.x)
            first = output
            probs = F.softmax(first.float(), dim=-1)
            weights, ids = torch.topk(probs, k, dim=-1)
            if lay.norm_topk_prob:
                weights = weights / weights.sum(-1, keepdim=True)
            weights = weights.to(first.dtype)
        if ids.dim() != 2:
            ids, weights, first = ids.reshape(-1, k), weights.reshape(-1, k), first.reshape(-1, first.shape[-1])
        return ids, weights, first

    # -- after the forward pass ------------------------------------------------------------------------------
    def clear(self) -> None:
        self._pending[:] = [None] * self.layout.num_layers

    @property
    def has_pending(self) -> bool:
        return any(p is not None for p in self._pending)

    def _pass_views(self, t: int, b: int, s: int, device: torch.device) -> tuple[Packing, int, dict[str, torch.Tensor]]:
        """Packing and device-buffer views for a pass shape, cached (building views costs host time)."""
        key = (t, b, s, device)
        cached = self._views.get(key)
        if cached is not None:
            return cached
        lay = self.layout
        # Routing fields are laid out [T, L, X], the trace's own order: the transpose happens on the device.
        fields: list[tuple[str, torch.dtype, tuple[int, ...]]] = [("tokens", torch.int64, (3, b, s)),
                                                                  ("ids", self.id_dtype, (t, lay.num_layers, lay.top_k))]
        if self.save_weights:
            fields.append(("weights", self.weights_dtype, (t, lay.num_layers, lay.top_k)))
        if self.save_logits:
            fields.append(("logits", torch.float16, (t, lay.num_layers, lay.num_experts)))
        packing, total = _packing(fields)
        buf = self._device_bytes
        if buf is None or buf.numel() < total or buf.device != device:
            # Grow with headroom; a copy still reading the old buffer is ordered before any reuse on the stream.
            size = max(total, 2 * (buf.numel() if buf is not None and buf.device == device else 0))
            buf = self._device_bytes = torch.empty(size, dtype=torch.uint8, device=device)
            self._views.clear()
        views = {name: buf[off: off + int(np.prod(shape)) * torch.empty((), dtype=dt).element_size()]
                 .view(dt).view(shape) for name, (off, dt, shape) in packing.items()}
        views["tokens"] = views["tokens"].view(3 * b, s)  # filled by one torch.cat of three [B, S] tensors
        self._views[key] = (packing, total, views)
        return self._views[key]

    def _stack_into(self, view: torch.Tensor, parts: list[torch.Tensor]) -> None:
        """L tensors [T, X] -> view [T, L, X]: one stack kernel (in the parts' dtype), then one converting copy."""
        dtype = parts[0].dtype
        if dtype == view.dtype:
            torch.stack(parts, dim=1, out=view)
            return
        key = (tuple(view.shape), dtype, view.device)
        stage = self._staging.get(key)
        if stage is None:
            stage = self._staging[key] = torch.empty(view.shape, dtype=dtype, device=view.device)
        torch.stack(parts, dim=1, out=stage)
        view.copy_(stage)

    def end_pass(self, tokens: PassTokens) -> HostPass:
        """Start moving the pass just run to the host: three or four kernels and one copy; never waits."""
        pending = self._pending
        if any(p is None for p in pending):
            missing = [self.layout.sites[i].name for i, p in enumerate(pending) if p is None]
            raise RuntimeError(f"routers did not run in this forward pass: {', '.join(missing[:3])}")
        if self.layout.convention == "3-tuple" and pending[0][2].dim() == 2:
            ids = [p[2] for p in pending]
            weights = [p[1] for p in pending]
            firsts = [p[0] for p in pending]
        else:
            reads = [self._read(p) for p in pending]
            ids, weights, firsts = [r[0] for r in reads], [r[1] for r in reads], [r[2] for r in reads]
        b, s = int(tokens.valid.shape[0]), int(tokens.valid.shape[1])
        device = ids[0].device
        on_cuda = device.type == "cuda"
        packing, total, views = self._pass_views(int(ids[0].shape[0]), b, s, device)
        token_parts = [tokens.position, tokens.token_id if tokens.token_id is not None else tokens.position,
                       tokens.valid]
        if on_cuda:
            token_parts = [x if x.device == device else x.to(device, non_blocking=True) for x in token_parts]
        # torch.stack/cat run as one kernel only when the output has the inputs' dtype (otherwise one copy per
        # input): stack into a staging buffer of the router's dtype, then convert into the packed view.
        torch.cat(token_parts, out=views["tokens"])
        self._stack_into(views["ids"], ids)
        if self.save_weights:
            self._stack_into(views["weights"], weights)
        if self.save_logits:
            self._stack_into(views["logits"], firsts)
        assert self._device_bytes is not None
        event = None
        if on_cuda:
            host = torch.empty(total, dtype=torch.uint8, pin_memory=True)
            host.copy_(self._device_bytes[:total], non_blocking=True)
            event = torch.cuda.Event()
            event.record()
        else:
            host = self._device_bytes[:total].clone()
        self.clear()
        return HostPass(host, packing, tokens.seq_id, tokens.token_id is not None, tokens.phase, tokens.step, event)

    def remove(self) -> None:
        """Detach every hook; the device buffer is kept for a later attach()."""
        for handle in self._handles:
            handle.remove()
        self._handles = []
        self.clear()


_FLUSH = object()  # queue marker: a producer waits on back-pressure, write now


class TraceSink:
    """Background writer: turns batches of HostPass into trace chunks, in order, with bounded memory.

    The thread wakes every `poll_seconds` rather than on each submit, converts what arrived (freeing its pinned
    buffers), and appends to the file once `flush_bytes` have gathered or `flush_seconds` have passed: every
    wake-up and every append takes Python's GIL from the main thread, whose decode loop is bound by how fast it
    launches kernels. Appends happen only at batch boundaries, so an interrupted trace holds whole batches;
    close() writes whatever is pending. `submit` blocks while more than `max_bytes` of pinned buffers wait
    (back-pressure; converted data waiting for an append is bounded by `flush_bytes`). With `writer=None` the
    chunks are kept in `self.chunks`.
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
        poll_seconds: float = 0.05,
        on_written: Callable[[int, int], None] | None = None,
    ):
        self.writer = writer
        self.with_token_ids = with_token_ids
        self.id_dtype = id_dtype
        self.weights_dtype = weights_dtype
        self.max_bytes = max_bytes
        self.flush_bytes = flush_bytes
        self.flush_seconds = flush_seconds
        self.poll_seconds = poll_seconds
        self.on_written = on_written
        self.chunks: list[TraceChunk] = []
        self.tokens_written = 0
        self.batches_written = 0
        self.busy_seconds = 0.0  # CPU time of the writer thread (mostly holding the GIL)
        self._queue: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._in_flight = 0
        self._cond = threading.Condition()
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="moe-trace-writer", daemon=True)
        self._thread.start()

    def submit(self, passes: list[HostPass], num_sequences: int) -> None:
        """Hand over one whole batch (all its passes); blocks while too much waits to be written."""
        nbytes = sum(p.nbytes for p in passes)
        with self._cond:
            if self._in_flight > 0 and self._in_flight + nbytes > self.max_bytes:
                self._queue.put(_FLUSH)
                while self._in_flight > 0 and self._in_flight + nbytes > self.max_bytes and self._error is None:
                    self._cond.wait()
            self._raise_if_failed()
            self._in_flight += nbytes
        self._queue.put((passes, num_sequences))

    def _run(self) -> None:
        pending: list[RawPass] = []  # passes copied out of pinned memory, waiting for the next append
        pending_bytes = pending_batches = pending_sequences = 0
        last_flush = time.monotonic()
        stop = False
        arrived: deque[Any] = deque()
        while not stop:
            time.sleep(self.poll_seconds)
            woke = time.thread_time()  # CPU time of this thread: excludes waiting for the GIL
            urgent = False
            while True:
                try:
                    arrived.append(self._queue.get_nowait())
                except queue.Empty:
                    break
            closing = any(item is None for item in arrived)
            while arrived:
                item = arrived[0]
                if item is None:
                    stop = urgent = True
                    arrived.popleft()
                    continue
                if item is _FLUSH:
                    urgent = True
                    arrived.popleft()
                    continue
                passes, sequences = item
                if not closing and not all(p.ready() for p in passes):
                    break  # copies still in flight: take them at the next wake-up instead of waiting here
                arrived.popleft()
                nbytes = sum(p.nbytes for p in passes)
                try:
                    if self._error is None:
                        # Copying out now frees the pinned buffers at once, so few stay in use and the pinned
                        # allocator keeps reusing the same blocks; conversion and append wait for a flush, where
                        # passes of one shape convert together.
                        pending.extend(p.release() for p in passes)
                        pending_bytes += nbytes
                        pending_batches += 1
                        pending_sequences += sequences
                except BaseException as exc:  # reported to the main thread at its next submit/close
                    self._error = exc
                finally:
                    del passes, item
                    with self._cond:
                        self._in_flight -= nbytes
                        self._cond.notify_all()
            due = urgent or pending_bytes >= self.flush_bytes or time.monotonic() - last_flush >= self.flush_seconds
            if not (due and pending):
                self.busy_seconds += time.thread_time() - woke
                continue
            try:
                if self._error is None:
                    self._write(pending, pending_batches, pending_sequences)
            except BaseException as exc:
                self._error = exc
            finally:
                last_flush = time.monotonic()
                pending = []
                pending_bytes = pending_batches = pending_sequences = 0
                self.busy_seconds += time.thread_time() - woke

    def _write(self, passes: list[RawPass], batches: int, sequences: int) -> None:
        chunk = passes_to_chunk(passes, self.with_token_ids, self.id_dtype, self.weights_dtype)
        if self.writer is not None:
            self.writer.append(chunk)
        else:
            self.chunks.append(chunk)
        self.tokens_written += chunk.num_tokens
        self.batches_written += batches
        if self.on_written is not None:
            self.on_written(sequences, chunk.num_tokens)

    def _raise_if_failed(self) -> None:
        if self._error is not None:
            raise self._error

    def close(self) -> None:
        """Write everything submitted, stop the thread, and re-raise a writer error."""
        if self._thread.is_alive():
            self._queue.put(None)
            self._thread.join()
        self._raise_if_failed()
