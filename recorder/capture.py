"""Capture router outputs with no host synchronisation inside the forward pass, and few host steps per pass.

During a forward pass each router's forward hook only keeps a reference to its output (no kernel, no copy).
`end_pass` files those references, with the pass's token columns, into a window of passes of one shape: a few list
appends, no kernel. Every `window_passes` passes (or when the shape changes, the window's tensors pass
`window_bytes`, or the caller calls `collect()` at a batch's end), `collect` stacks the whole window into views of one
preallocated device byte buffer, laid out [N, T, L, X] (N passes, the trace's own row order), with two kernels per
field whatever N is, starts one non-blocking copy into pinned host memory and records a CUDA event. So the host cost
of moving routing off the device is paid once per window rather than once per pass: in HF decode, which is bound by
how fast the main thread launches kernels, that is what counts. A background thread (`TraceSink`) copies finished
blocks out of pinned memory, drops padding rows and appends whole batches to the trace; a byte budget on the work
in flight gives back-pressure, and the window's own limits bound what it keeps alive on the device.

Holding router outputs across passes is exact because eager PyTorch allocates fresh outputs every pass and never
writes into a tensor that is still referenced. Under CUDA graphs (outputs in static memory, overwritten by the next
replay) use `window_passes=1`, which copies every pass before the next one runs.

Shape legend: N passes in a window, B batch rows, S tokens per row in a pass, T = B * S rows (padding included),
L MoE layers, K top-k, E experts.
"""

from __future__ import annotations

import contextlib
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from recorder.routers import RouterLayout, topk_from_logits
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


# One block of passes travels as one byte buffer: fields at 8-byte aligned offsets. name -> (offset, dtype, shape)
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
class BlockInfo:
    """Who the N passes of a block are: one entry per pass."""

    seq_ids: list[np.ndarray]  # N x [B]
    phases: list[int]
    steps: list[int]
    has_token_ids: bool


@dataclass
class HostBlock:
    """N passes of one shape in one host byte buffer (pinned on CUDA).

    Until `start()` runs (at once, or in the writer thread when the capture has `copy_in_writer`) the block holds
    references to the window's device tensors and no data. After it, the copy into `data` may still be in flight
    until `event` completes; only the writer thread waits for it.
    Fields: tokens [N, 2, B, S] (position, token id), valid [N, B, S], ids, weights, logits [N, T, L, X].
    """

    packing: Packing
    info: BlockInfo
    nbytes: int
    source: Any = None  # (RoutingCapture, _Window, stream) until started
    data: torch.Tensor | None = None  # uint8 [nbytes]
    event: Any = None  # torch.cuda.Event or None

    @property
    def num_passes(self) -> int:
        return len(self.info.steps)

    def start(self) -> None:
        """Launch the window's gather kernels and its copy to the host (never waits); a no-op once started."""
        if self.source is not None:
            capture, window, stream = self.source
            self.source = None
            self.data, self.event = capture._copy_window(window, self.packing, self.nbytes, stream)

    def ready(self) -> bool:
        """True once the copy to the host has finished (never blocks)."""
        self.start()
        return self.event is None or bool(self.event.query())

    def release(self) -> RawBlock:
        """A plain copy of the bytes, so the pinned buffer goes back to the allocator now (waits for the copy)."""
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


def _convert(block: RawBlock, with_token_ids: bool, id_dtype: np.dtype, weights_dtype: np.dtype) -> TraceChunk:
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


@dataclass
class _Window:
    """References to the outputs of passes not yet copied (all of one shape), in pass order."""

    key: tuple  # (T, B, S, has token ids, device)
    ids: list[torch.Tensor] = field(default_factory=list)  # N * L x [T, K], pass-major
    weights: list[torch.Tensor] = field(default_factory=list)
    logits: list[torch.Tensor] = field(default_factory=list)  # N * L x [T, E]
    tokens: list[torch.Tensor] = field(default_factory=list)  # N * 2 x [B, S] int64: position, token id
    valid: list[torch.Tensor] = field(default_factory=list)  # N x [B, S] bool
    info: BlockInfo = field(default_factory=lambda: BlockInfo([], [], [], False))
    nbytes: int = 0  # device bytes the references keep alive


class RoutingCapture:
    """Forward hooks on every router of `layout`; `end_pass` files a pass, `collect` moves a window to the host.

    `window_passes` passes (or `window_bytes` of referenced outputs) make one window; 1 copies every pass at once.
    """

    def __init__(
        self,
        layout: RouterLayout,
        *,
        save_weights: bool = True,
        save_logits: bool = False,
        weights_dtype: torch.dtype = torch.float16,
        window_passes: int = 64,
        window_bytes: int = 64 << 20,
        copy_in_writer: bool = False,
    ):
        if window_passes < 1:
            raise ValueError("window_passes must be at least 1")
        self.layout = layout
        self.save_weights = save_weights
        self.save_logits = save_logits
        self.weights_dtype = weights_dtype
        self.window_passes = window_passes
        self.window_bytes = window_bytes
        # Launch a window's gather kernels and copy from TraceSink's thread (with the GIL released inside the
        # kernels' C++), so the main thread only files references. Only for eager code: the window's tensors stay
        # referenced until the writer gets to them.
        self.copy_in_writer = copy_in_writer
        self._copy_lock = threading.Lock()  # the device buffer is shared by every block's copy
        # uint8 ids on the device when they fit; int32 otherwise (torch has few uint16 kernels).
        self.id_dtype = torch.uint8 if layout.num_experts <= 256 else torch.int32
        self._pending: list[Any] = [None] * layout.num_layers
        self._window: _Window | None = None
        self._device_bytes: torch.Tensor | None = None
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
            weights, ids = topk_from_logits(first, k, norm_topk_prob=lay.norm_topk_prob)
            weights = weights.to(first.dtype)
        if ids.dim() != 2:
            ids, weights, first = ids.reshape(-1, k), weights.reshape(-1, k), first.reshape(-1, first.shape[-1])
        return ids, weights, first

    # -- after the forward pass ------------------------------------------------------------------------------
    def drop_pass(self) -> None:
        """Forget router outputs of the pass under way (the window keeps the passes already filed)."""
        self._pending[:] = [None] * self.layout.num_layers

    def clear(self) -> None:
        """Forget the current pass and every pass of the window not collected yet (e.g. a failed batch)."""
        self.drop_pass()
        self._window = None

    @property
    def has_pending(self) -> bool:
        return any(p is not None for p in self._pending)

    @property
    def window_size(self) -> int:
        """Passes filed and not yet collected."""
        return 0 if self._window is None else len(self._window.info.steps)

    def end_pass(self, tokens: PassTokens) -> list[HostBlock]:
        """File the pass just run: list appends only, no kernel (none at all in steady decode), never waits.

        Returns the blocks whose copies this call started: usually none; one when the window filled up or the pass
        shape changed.
        """
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
        pending[:] = [None] * len(pending)
        b, s = int(tokens.valid.shape[0]), int(tokens.valid.shape[1])
        t = int(ids[0].shape[0])
        if t != b * s:
            raise RuntimeError(f"routers saw {t} rows but the pass has {b} x {s} tokens")
        device = ids[0].device
        key = (t, b, s, tokens.token_id is not None, device)
        out: list[HostBlock] = []
        w = self._window
        if w is not None and w.key != key:
            out += self._collect_window()
            w = None
        if w is None:
            w = self._window = _Window(key)
            w.info.has_token_ids = tokens.token_id is not None
        w.ids += ids
        nbytes = t * len(ids) * ids[0].shape[-1] * ids[0].element_size()
        if self.save_weights:
            w.weights += weights
            nbytes += nbytes // ids[0].element_size() * weights[0].element_size()
        if self.save_logits:
            w.logits += firsts
            nbytes += t * len(ids) * firsts[0].shape[-1] * firsts[0].element_size()
        w.tokens += [self._on(tokens.position, device, torch.int64),
                     self._on(tokens.token_id if tokens.token_id is not None else tokens.position, device, torch.int64)]
        w.valid.append(self._on(tokens.valid, device, torch.bool))
        w.info.seq_ids.append(tokens.seq_id)
        w.info.phases.append(tokens.phase)
        w.info.steps.append(tokens.step)
        w.nbytes += nbytes
        if len(w.info.steps) >= self.window_passes or w.nbytes >= self.window_bytes:
            out += self._collect_window()
        return out

    @staticmethod
    def _on(x: torch.Tensor, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
        """x on `device` in `dtype` [B, S]: a no-op (no kernel) when it already is."""
        if x.device != device:
            x = x.to(device, non_blocking=True)
        return x if x.dtype == dtype else x.to(dtype)

    def collect(self) -> list[HostBlock]:
        """Start copying every filed pass to the host (at a batch's end, before stopping): zero or one block."""
        return self._collect_window()

    def _collect_window(self) -> list[HostBlock]:
        w, self._window = self._window, None
        if w is None or not w.info.steps:
            return []
        lay = self.layout
        n = len(w.info.steps)
        t, b, s, _, device = w.key
        fields: list[tuple[str, torch.dtype, tuple[int, ...]]] = [
            ("tokens", torch.int64, (n, 2, b, s)), ("valid", torch.bool, (n, b, s)),
            ("ids", self.id_dtype, (n, t, lay.num_layers, lay.top_k)),
        ]
        if self.save_weights:
            fields.append(("weights", self.weights_dtype, (n, t, lay.num_layers, lay.top_k)))
        if self.save_logits:
            fields.append(("logits", torch.float16, (n, t, lay.num_layers, lay.num_experts)))
        packing, total = _packing(fields)
        # The copy must follow the passes on the stream that ran them, whichever thread launches it.
        stream = torch.cuda.current_stream(device) if device.type == "cuda" else None
        block = HostBlock(packing, w.info, total, source=(self, w, stream))
        if not self.copy_in_writer:
            block.start()
        return [block]

    def _copy_window(self, w: _Window, packing: Packing, total: int, stream: Any) -> tuple[torch.Tensor, Any]:
        """Gather window `w` into the device byte buffer and start one copy to (pinned) host memory."""
        device = w.key[4]
        n, b, s = len(w.info.steps), w.key[1], w.key[2]
        streamed = torch.cuda.stream(stream) if stream is not None else contextlib.nullcontext()
        # Inference mode whoever calls: the buffer is written in place by every copy, and router outputs may
        # require grad.
        with self._copy_lock, torch.inference_mode(), streamed:
            buf = self._device_bytes
            if buf is None or buf.numel() < total or buf.device != device:
                # Grow with headroom; a copy still reading the old buffer is ordered before any reuse on the stream.
                size = max(total, 2 * (buf.numel() if buf is not None and buf.device == device else 0))
                buf = self._device_bytes = torch.empty(size, dtype=torch.uint8, device=device)
            views = {name: buf[off: off + int(np.prod(shape)) * torch.empty((), dtype=dt).element_size()]
                     .view(dt).view(shape) for name, (off, dt, shape) in packing.items()}
            torch.stack(w.tokens, out=views["tokens"].view(2 * n, b, s))
            torch.stack(w.valid, out=views["valid"])
            self._gather(views["ids"], w.ids)
            if self.save_weights:
                self._gather(views["weights"], w.weights)
            if self.save_logits:
                self._gather(views["logits"], w.logits)
            event = None
            if device.type == "cuda":
                host = torch.empty(total, dtype=torch.uint8, pin_memory=True)
                host.copy_(buf[:total], non_blocking=True)
                event = torch.cuda.Event()
                event.record(stream)
            else:
                host = buf[:total].clone()
        return host, event

    @staticmethod
    def _gather(view: torch.Tensor, parts: list[torch.Tensor]) -> None:
        """N * L tensors [T, X] (pass-major) -> view [N, T, L, X]: one stack kernel in the parts' dtype (a stack
        into another dtype would launch one copy per part), then one converting, transposing copy."""
        n, t, layers, x = view.shape
        stage = torch.empty((n * layers, t, x), dtype=parts[0].dtype, device=view.device)
        torch.stack(parts, out=stage)
        view.copy_(stage.view(n, layers, t, x).transpose(1, 2))

    def remove(self) -> None:
        """Detach every hook. Passes already filed stay in the window for collect() (or clear()); the device buffer
        is kept for a later attach()."""
        for handle in self._handles:
            handle.remove()
        self._handles = []
        self.drop_pass()


_FLUSH = object()  # queue marker: a producer waits on back-pressure, write now
_STOP = object()  # queue marker: write everything and end the thread


class TraceSink:
    """Background writer: turns batches of HostBlock into trace chunks, in order, with bounded memory.

    Every time the thread takes Python's GIL it stalls the main thread, whose decode loop is bound by how fast it
    launches kernels; so the thread sleeps on its queue (no GIL, no periodic wake-ups) until a batch arrives, wakes
    at most once per `poll_seconds`, waits for the block's copy with the GIL released, and appends to the file only
    once `flush_bytes` have gathered or `flush_seconds` have passed (few, large appends). Appends happen only at
    batch boundaries, so an interrupted trace holds whole batches; close() writes whatever is pending. `submit`
    blocks while more than `max_bytes` of pinned buffers wait (back-pressure; converted data waiting for an append
    is bounded by `flush_bytes`). With `writer=None` the chunks are kept in `self.chunks`.
    """

    def __init__(
        self,
        writer: TraceWriter | None,
        *,
        with_token_ids: bool,
        id_dtype: np.dtype,
        weights_dtype: np.dtype,
        max_bytes: int = 1 << 30,
        flush_bytes: int = 32 << 20,
        flush_seconds: float = 5.0,
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
        self.busy_seconds = 0.0  # CPU time of the writer thread (GIL held or not)
        self._queue: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._in_flight = 0
        self._cond = threading.Condition()
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="moe-trace-writer", daemon=True)
        self._thread.start()

    def submit(self, blocks: list[HostBlock], num_sequences: int) -> None:
        """Hand over one whole batch (all its blocks); blocks while too much waits to be written."""
        nbytes = sum(b.nbytes for b in blocks)
        with self._cond:
            if self._in_flight > 0 and self._in_flight + nbytes > self.max_bytes:
                self._queue.put(_FLUSH)
                while self._in_flight > 0 and self._in_flight + nbytes > self.max_bytes and self._error is None:
                    self._cond.wait()
            self._raise_if_failed()
            self._in_flight += nbytes
        self._queue.put((blocks, num_sequences))

    def _run(self) -> None:
        pending: list[RawBlock] = []  # blocks copied out of pinned memory, waiting for the next append
        pending_bytes = pending_batches = pending_sequences = 0
        last_flush = last_wake = time.monotonic()
        stop = False
        while not stop:
            # Asleep without the GIL until a batch arrives (or a pending append falls due).
            timeout = None if not pending else max(0.0, last_flush + self.flush_seconds - time.monotonic())
            items: list[Any] = []
            with contextlib.suppress(queue.Empty):
                items.append(self._queue.get(timeout=timeout))
            rest = last_wake + self.poll_seconds - time.monotonic()
            if rest > 0 and items and items[0] is not _STOP:
                time.sleep(rest)  # at most one wake-up per poll_seconds: later batches join this one
            last_wake = time.monotonic()
            woke = time.thread_time()  # CPU time of this thread
            while True:
                try:
                    items.append(self._queue.get_nowait())
                except queue.Empty:
                    break
            urgent = False
            for item in items:
                if item is _STOP or item is _FLUSH:
                    stop = stop or item is _STOP
                    urgent = True
                    continue
                blocks, sequences = item
                nbytes = sum(b.nbytes for b in blocks)
                try:
                    if self._error is None:
                        # Waits for the copy with the GIL released; copying out frees the pinned buffers at once,
                        # so the pinned allocator keeps reusing a few blocks.
                        for b in blocks:
                            b.start()  # launches the copy of a block filed with copy_in_writer
                        pending.extend(b.release() for b in blocks)
                        pending_bytes += nbytes
                        pending_batches += 1
                        pending_sequences += sequences
                except BaseException as exc:  # reported to the main thread at its next submit/close
                    self._error = exc
                finally:
                    del blocks, item
                    with self._cond:
                        self._in_flight -= nbytes
                        self._cond.notify_all()
            del items
            due = urgent or pending_bytes >= self.flush_bytes or time.monotonic() - last_flush >= self.flush_seconds
            if due and pending:
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

    def _write(self, blocks: list[RawBlock], batches: int, sequences: int) -> None:
        chunk = blocks_to_chunk(blocks, self.with_token_ids, self.id_dtype, self.weights_dtype)
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
            self._queue.put(_STOP)
            self._thread.join()
        self._raise_if_failed()
