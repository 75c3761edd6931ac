"""Capture router outputs with no host synchronisation inside the forward pass, and few host steps per pass.

During a forward pass each router's forward hook only keeps a reference to its output (no kernel, no copy).
`end_pass` files those references, with the pass's token columns, into a window of passes of one shape: a few
list appends, no kernel. Every `window_passes` passes (or when the shape changes, the window's tensors pass
`window_bytes`, or the caller calls `collect()` at a batch's end), `collect` stacks the whole window into
views of one preallocated device byte buffer, laid out [N, T, L, X] (N passes, the trace's own row order),
with two kernels per field whatever N is, starts one non-blocking copy into pinned host memory and records a
CUDA event. So the host cost of moving routing off the device is paid once per window rather than once per
pass: in HF decode, which is bound by how fast the main thread launches kernels, that is what counts. A
background thread (`TraceSink`, sink.py) copies finished blocks (blocks.py) out of pinned memory, drops
padding rows and appends whole batches to the trace; a byte budget on the work in flight gives back-pressure,
and the window's own limits bound what it keeps alive on the device.

Holding router outputs across passes is exact because eager PyTorch allocates fresh outputs every pass and
never writes into a tensor that is still referenced. Under CUDA graphs (outputs in static memory, overwritten
by the next replay) use `window_passes=1`, which copies every pass before the next one runs. Three checks make
sure a trace never holds missing or stale passes silently: a router that runs inside CUDA graph capture (its
hook would not run on replay) raises GraphRecordingError at once; a pass whose held router outputs reuse the
memory of outputs the window still holds (static buffers overwritten in place) raises it too; and MoEProfiler
raises when the model ran but its routers' hooks did not. Under torch.compile the hooks are traced into the
compiled code (a list store, no graph break) and record as in eager mode.

Shape legend: N passes in a window, B batch rows, S tokens per row in a pass, T = B * S rows (padding
included), L MoE layers, K top-k, E experts.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from recorder.blocks import BlockInfo, HostBlock, Packing, packing_of
from recorder.routers import RouterLayout, topk_from_logits

# ids [T, K], weights [T, K], first output [T, E]
RouterRead = tuple[torch.Tensor, torch.Tensor, torch.Tensor]

GRAPH_CAPTURE = ("a router ran inside CUDA graph capture: its hook does not run when the graph is replayed, "
                 "so the trace would miss those passes; record without CUDA graphs (eager, or torch.compile "
                 "without mode='reduce-overhead' and without a static cache)")
STATIC_OUTPUTS = ("router outputs were overwritten in place by the next pass (static buffers, as CUDA graph "
                  "replays write them), so the passes held for copying are stale; record with "
                  "window_passes=1 (MoEProfiler's default), which copies every pass before the next one runs")


class GraphRecordingError(RuntimeError):
    """Routing cannot be recorded correctly in the way the model runs (CUDA graphs); one line says why and
    what to do."""


@dataclass
class PassTokens:
    """Who the T = B * S rows of one forward pass are (row r = b * S + s). Tensors may live on the device."""

    seq_id: np.ndarray  # [B] prompt index of each batch row
    position: torch.Tensor  # [B, S]
    token_id: torch.Tensor | None  # [B, S]
    valid: torch.Tensor  # [B, S] bool (or 0/1): False for padding and finished sequences
    phase: int
    step: int




@dataclass
class PassWindow:
    """References to the outputs of passes not yet copied (all of one shape), in pass order."""

    key: tuple  # (T, B, S, has token ids, device)
    ids: list[torch.Tensor] = field(default_factory=list)  # N * L x [T, K], pass-major
    held: set[int] = field(default_factory=set)  # data_ptr of the first router's outputs the window holds
    weights: list[torch.Tensor] = field(default_factory=list)
    logits: list[torch.Tensor] = field(default_factory=list)  # N * L x [T, E]
    tokens: list[torch.Tensor] = field(default_factory=list)  # N * 2 x [B, S] int64: position, token id
    valid: list[torch.Tensor] = field(default_factory=list)  # N x [B, S] bool
    info: BlockInfo = field(default_factory=lambda: BlockInfo([], [], [], False))
    nbytes: int = 0  # device bytes the references keep alive


class RoutingCapture:
    """Forward hooks on every router of `layout`; `end_pass` files a pass, `collect` moves a window to the
    host.

    `window_passes` passes (or `window_bytes` of referenced outputs) make one window; 1 copies every pass at
    once.
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
        # kernels' C++), so the main thread only files references. Only for eager code: the window's tensors
        # stay referenced until the writer gets to them.
        self.copy_in_writer = copy_in_writer
        self._copy_lock = threading.Lock()  # the device buffer is shared by every block's copy
        # uint8 ids on the device when they fit; int32 otherwise (torch has few uint16 kernels).
        self.id_dtype = torch.uint8 if layout.num_experts <= 256 else torch.int32
        self._pending: list[Any] = [None] * layout.num_layers
        self._window: PassWindow | None = None
        self._device_bytes: torch.Tensor | None = None
        self._handles: list[Any] = []
        self.attach()

    def attach(self) -> None:
        """Register the router hooks (done by the constructor; again after remove())."""
        if not self._handles:
            self._handles = [
                site.module.register_forward_hook(self._make_hook(slot))
                for slot, site in enumerate(self.layout.sites)
            ]

    # -- inside the forward pass: one list store per router, nothing else ------------------------------------
    def _make_hook(self, slot: int) -> Callable[..., None]:
        pending = self._pending
        # Only the first router checks for graph capture (one C++ call per pass, not per layer): a captured
        # forward runs it too. Under torch.compile the check is skipped while tracing (capture happens below
        # the hooks).
        check = slot == 0 and torch.cuda.is_available()

        def hook(module: torch.nn.Module, args: Any, output: Any) -> None:
            if check and not torch.compiler.is_compiling() and torch.cuda.is_current_stream_capturing():
                raise GraphRecordingError(GRAPH_CAPTURE)
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
            ids, weights, first = ids.reshape(-1, k), weights.reshape(-1, k), first.reshape(-1,
                                                                                            first.shape[-1])
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

        Returns the blocks whose copies this call started: usually none; one when the window filled up or the
        pass shape changed.
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
            w = self._window = PassWindow(key)
            w.info.has_token_ids = tokens.token_id is not None
        held = {ids[0].data_ptr()} | ({weights[0].data_ptr()} if self.save_weights else set()) \
            | ({firsts[0].data_ptr()} if self.save_logits else set())
        if held & w.held:  # a live tensor's memory handed out again: only static buffers do that
            self._window = None
            raise GraphRecordingError(STATIC_OUTPUTS)
        w.held |= held
        w.ids += ids
        nbytes = t * len(ids) * ids[0].shape[-1] * ids[0].element_size()
        if self.save_weights:
            w.weights += weights
            nbytes += nbytes // ids[0].element_size() * weights[0].element_size()
        if self.save_logits:
            w.logits += firsts
            nbytes += t * len(ids) * firsts[0].shape[-1] * firsts[0].element_size()
        w.tokens += [self._on(tokens.position, device, torch.int64),
                     self._on(tokens.token_id if tokens.token_id is not None else tokens.position, device,
                              torch.int64)]
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
        """Start copying every filed pass to the host (at a batch's end, before stopping): zero or one
        block."""
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
        packing, total = packing_of(fields)
        # The copy must follow the passes on the stream that ran them, whichever thread launches it.
        stream = torch.cuda.current_stream(device) if device.type == "cuda" else None
        block = HostBlock(packing, w.info, total, launch=partial(self.copy_window, w, packing, total, stream))
        if not self.copy_in_writer:
            block.start()
        return [block]

    def copy_window(self, w: PassWindow, packing: Packing, total: int,
                    stream: Any) -> tuple[torch.Tensor, Any]:
        """Gather window `w` into the device byte buffer and start one copy to (pinned) host memory."""
        device = w.key[4]
        n, b, s = len(w.info.steps), w.key[1], w.key[2]
        streamed = torch.cuda.stream(stream) if stream is not None else contextlib.nullcontext()
        # Inference mode whoever calls: the buffer is written in place by every copy, and router outputs may
        # require grad.
        with self._copy_lock, torch.inference_mode(), streamed:
            buf = self._device_bytes
            if buf is None or buf.numel() < total or buf.device != device:
                # Grow with headroom; a copy still reading the old buffer is ordered before any reuse on the
                # stream.
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
        """N * L tensors [T, X] (pass-major) -> view [N, T, L, X]: one stack kernel in the parts' dtype (a
        stack into another dtype would launch one copy per part), then one converting, transposing copy."""
        n, t, layers, x = view.shape
        stage = torch.empty((n * layers, t, x), dtype=parts[0].dtype, device=view.device)
        torch.stack(parts, out=stage)
        view.copy_(stage.view(n, layers, t, x).transpose(1, 2))

    def remove(self) -> None:
        """Detach every hook. Passes already filed stay in the window for collect() (or clear()); the device
        buffer is kept for a later attach()."""
        for handle in self._handles:
            handle.remove()
        self._handles = []
        self.drop_pass()
