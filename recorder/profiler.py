"""MoEProfiler: record the routing of whatever a user runs through a transformers MoE model.

>>> prof = MoEProfiler(model)
>>> with prof:
...     model.generate(**inputs, max_new_tokens=16)
>>> prof.print_summary()
>>> prof.save("trace.h5")
>>> prof.remove()

Each forward pass of the model is one step. A pass whose KV cache is empty (or that has none) is a prefill of
new sequences (seq_ids continue from the last pass); a pass that extends a non-empty cache is decode of the
sequences of the last prefill. Padding is excluded where an attention mask is given; positions come from
`position_ids`, else from the attention mask, else from the cache length.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
from rich.console import Console
from rich.table import Table

from recorder.capture import GraphRecordingError, PassTokens, RoutingCapture
from recorder.metadata import build_metadata
from recorder.routers import discover_routers
from recorder.sink import TraceSink
from traces.chunk import TraceChunk
from traces.schema import PHASE_DECODE, PHASE_PREFILL, TraceMetadata
from traces.stats import layer_loads
from traces.writer import write_trace


class MoEProfiler:
    """Finds every MoE router of `model`; start()/stop() (or `with`) record the routing of the passes run."""

    def __init__(self, model: Any, *, save_logits: bool = False, token_ids: bool = True,
                 model_id: str | None = None, window_passes: int = 1):
        self.model = model
        self.layout = discover_routers(model)
        self.save_logits = save_logits
        self.token_ids = token_ids
        # passes per device->host copy; >1 only for eager code (see capture.py)
        self.window_passes = window_passes
        self.model_id = model_id or str(getattr(model.config, "name_or_path", "") or type(model).__name__)
        self.chunks: list[TraceChunk] = []
        self._capture: RoutingCapture | None = None
        self._sink: TraceSink | None = None
        self._hooks: list[Any] = []
        self._step = 0
        self._next_seq = 0
        self._batch_base = 0
        self._batch_rows = 0
        self._tokens: PassTokens | None = None

    # -- recording -------------------------------------------------------------------------------------------
    @property
    def recording(self) -> bool:
        return self._capture is not None

    def start(self) -> MoEProfiler:
        if self.recording:
            return self
        meta = self.metadata()
        # One pass per window: the user's code may reuse input buffers or run under CUDA graphs, so every pass
        # is copied before the next one runs (record() batches the copies of its own eager decode loop
        # instead).
        self._capture = RoutingCapture(self.layout, save_logits=self.save_logits,
                                       window_passes=self.window_passes)
        self._sink = TraceSink(None, with_token_ids=self.token_ids, id_dtype=meta.id_dtype,
                               weights_dtype=np.dtype(meta.weights_dtype))
        self._hooks = [
            self.model.register_forward_pre_hook(self._before_pass, with_kwargs=True),
            self.model.register_forward_hook(self._after_pass),
        ]
        return self

    def stop(self) -> MoEProfiler:
        """Stop recording; everything recorded so far is in `self.chunks`."""
        for hook in self._hooks:
            hook.remove()
        self._hooks = []
        if self._capture is not None:
            if self._sink is not None:
                self._sink.submit(self._capture.collect(), 0)
            self._capture.remove()
            self._capture = None
        if self._sink is not None:
            self._sink.close()
            self.chunks.extend(self._sink.chunks)
            self._sink = None
        return self

    def remove(self) -> None:
        """Detach every hook this profiler added (the model runs exactly as before)."""
        self.stop()

    def reset(self) -> None:
        self.chunks = []
        self._step = self._next_seq = 0

    def __enter__(self) -> MoEProfiler:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _before_pass(self, module: Any, args: tuple, kwargs: dict[str, Any]) -> None:
        assert self._capture is not None
        self._capture.drop_pass()
        ids = kwargs.get("input_ids", args[0] if args else None)
        embeds = kwargs.get("inputs_embeds")
        shape_src = ids if ids is not None else embeds
        if shape_src is None:
            self._tokens = None
            return
        b, s = int(shape_src.shape[0]), int(shape_src.shape[1])
        cache = kwargs.get("cache", kwargs.get("past_key_values"))
        past = int(cache.get_seq_length()) if cache is not None and hasattr(cache, "get_seq_length") else 0
        decode = past > 0 and b == self._batch_rows
        if not decode:
            self._batch_base, self._batch_rows = self._next_seq, b
            self._next_seq += b
        dev = shape_src.device
        mask = kwargs.get("attention_mask")
        valid = mask[:, -s:].bool() if mask is not None and mask.dim() == 2 else torch.ones((b, s),
                                                                                            dtype=torch.bool,
                                                                                                 device=dev)
        position = kwargs.get("position_ids")
        if position is None and mask is not None and mask.dim() == 2:
            position = (mask.long().cumsum(-1) - 1).clamp(min=0)[:, -s:]
        if position is None:
            position = (torch.arange(s, device=dev) + past).expand(b, s)
        self._tokens = PassTokens(
            seq_id=np.arange(self._batch_base, self._batch_base + b),
            position=position.expand(b, s),
            token_id=ids if (ids is not None and self.token_ids) else None,
            valid=valid,
            phase=PHASE_DECODE if decode else PHASE_PREFILL,
            step=self._step,
        )

    def _after_pass(self, module: Any, args: tuple, output: Any) -> None:
        assert self._capture is not None and self._sink is not None
        if self._tokens is None:
            return
        # the model ran, its routers' hooks did not: never lose passes silently
        if not self._capture.has_pending:
            self._tokens = None
            raise GraphRecordingError("the model ran but none of its routers' hooks did (a compiled or "
                                      "captured region that skips forward hooks?); refusing to record a "
                                      "trace with missing passes: run the model eagerly or with "
                                      "torch.compile's default mode")
        blocks = self._capture.end_pass(self._tokens)
        self._step += 1
        if blocks:
            self._sink.submit(blocks,
                              self._tokens.valid.shape[0] if self._tokens.phase == PHASE_PREFILL else 0)
        self._tokens = None

    # -- results ---------------------------------------------------------------------------------------------
    def metadata(self) -> TraceMetadata:
        return build_metadata(self.model, self.layout, model_id=self.model_id, token_ids=self.token_ids,
                              save_logits=self.save_logits, notes={"recorded_with": "MoEProfiler"})

    def trace(self) -> TraceChunk:
        """Everything recorded so far as one chunk (stop() first to include passes still being written)."""
        if not self.chunks:
            meta = self.metadata()
            return TraceChunk(**{n: np.zeros((0, *meta.field_shape(n)), meta.field_dtype(n))
                                 for n in meta.stored_fields()})
        return TraceChunk.concat(self.chunks)

    def expert_counts(self) -> np.ndarray:
        """[L, E] tokens routed to each expert of each MoE layer."""
        lay = self.layout
        counts = np.zeros((lay.num_layers, lay.num_experts), dtype=np.int64)
        for chunk in self.chunks:
            assert chunk.expert_ids is not None
            for layer in range(lay.num_layers):
                counts[layer] += np.bincount(chunk.expert_ids[:, layer].reshape(-1).astype(np.int64),
                                             minlength=lay.num_experts)
        return counts

    def print_summary(self, console: Console | None = None) -> None:
        """Per-layer expert load, imbalance and expert FLOPs (from the actual top-k and expert size)."""
        if self.recording:
            self.stop()
        console = console or Console()
        meta = self.metadata()
        tokens = sum(c.num_tokens for c in self.chunks)
        table = Table(title=f"MoE routing: {self.model_id} ({tokens:,} tokens, top-{meta.top_k} of "
                            f"{meta.num_experts} experts)")
        for col in ("layer", "module", "busiest expert", "max share", "max/mean", "idle experts",
                    "expert GFLOPs"):
            table.add_column(col, justify="left" if col == "module" else "right")
        counts = self.expert_counts()
        for layer, name, row in zip(meta.moe_layers, meta.moe_module_names,
                                    layer_loads(counts, meta.moe_layers), strict=True):
            gflops = row.assignments * meta.flops_per_assignment / 1e9
            table.add_row(str(layer), name, str(row.top_expert), f"{row.top_share:.1%}",
                          f"{row.max_over_mean:.2f}", str(row.idle), f"{gflops:,.3f}")
        console.print(table)

    def save(self, path: str | Path, *, force: bool = False) -> Path:
        """Write what was recorded to a trace file (.h5 or .arrow)."""
        if self.recording:
            self.stop()
        return write_trace(path, self.metadata(), self.trace(), force=force)
