"""The background writer thread: whole batches of blocks into trace chunks, in order, with bounded memory."""

from __future__ import annotations

import contextlib
import queue
import threading
import time
from collections.abc import Callable
from typing import Any

import numpy as np

from recorder.blocks import HostBlock, RawBlock, blocks_to_chunk
from traces.chunk import TraceChunk
from traces.writer import TraceWriter

_FLUSH = object()  # queue marker: a producer waits on back-pressure, write now
_STOP = object()  # queue marker: write everything and end the thread


class TraceSink:
    """Background writer: turns batches of HostBlock into trace chunks, in order, with bounded memory.

    Every time the thread takes Python's GIL it stalls the main thread, whose decode loop is bound by how fast
    it launches kernels; so the thread sleeps on its queue (no GIL, no periodic wake-ups) until a batch
    arrives, wakes at most once per `poll_seconds`, waits for the block's copy with the GIL released, and
    appends to the file only once `flush_bytes` have gathered or `flush_seconds` have passed (few, large
    appends). Appends happen only at batch boundaries, so an interrupted trace holds whole batches; close()
    writes whatever is pending. `submit` blocks while more than `max_bytes` of pinned buffers wait
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
                while (self._in_flight > 0 and self._in_flight + nbytes > self.max_bytes
                       and self._error is None):
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
                        # Waits for the copy with the GIL released; copying out frees the pinned buffers at
                        # once, so the pinned allocator keeps reusing a few blocks.
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
            due = (urgent or pending_bytes >= self.flush_bytes
                   or time.monotonic() - last_flush >= self.flush_seconds)
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
