"""Recording under torch.compile and CUDA graphs: the same routing as eager, or a one-line refusal, never a
trace with missing or stale passes.

CPU: torch.compile (eager backend) records what eager records; router outputs written into static buffers
(what a CUDA graph replay does) are refused when a window holds passes, and recorded exactly one pass per
window; a model whose routers' hooks did not run is refused. GPU (skipped without CUDA): a forward captured
into a CUDA graph is refused at capture; torch.compile with mode="reduce-overhead" (CUDA graphs) records the
eager routing or refuses.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from recorder import MoEProfiler
from recorder.blocks import blocks_to_chunk
from recorder.builtin_models import build_builtin_model, build_builtin_tokenizer
from recorder.capture import GRAPH_CAPTURE, STATIC_OUTPUTS, GraphRecordingError, PassTokens, RoutingCapture
from recorder.routers import discover_routers

PROMPTS = ["The quick brown fox", "MoE routing, recorded"]


def _generate(device: str, compile_mode: str | None = None, backend: str = "inductor") -> np.ndarray:
    """expert ids [tokens, L, K] MoEProfiler records over a short greedy generate of olmoe-tiny."""
    model = build_builtin_model("olmoe-tiny", torch.device(device), torch.float32)
    tokenizer = build_builtin_tokenizer()
    inputs = tokenizer(PROMPTS, return_tensors="pt", padding=True).to(device)
    prof = MoEProfiler(model)
    if compile_mode is not None or backend != "inductor":
        model.forward = torch.compile(model.forward, backend=backend, mode=compile_mode)
    # CUDA graphs need a cache whose tensors stay put between replays: transformers' static cache, as its fast
    # generation path uses with mode="reduce-overhead" (a dynamic cache's outputs are overwritten by the next
    # replay, which torch refuses before any routing is read)
    extra = {"cache_implementation": "static"} if compile_mode == "reduce-overhead" else {}
    with prof, torch.no_grad():
        model.generate(**inputs, max_new_tokens=5, do_sample=False, **extra)
    ids = prof.trace().expert_ids
    assert ids is not None and len(ids) > 0
    return ids


def test_torch_compile_records_what_eager_records() -> None:
    np.testing.assert_array_equal(_generate("cpu", backend="eager"), _generate("cpu"))


def _static_outputs(layout) -> list:
    """Forward hooks that copy each router's outputs into buffers of their own and return those instead, as a
    CUDA graph replay writes every pass into the same memory."""
    static: dict[int, tuple[torch.Tensor, ...]] = {}

    def make(slot: int):
        def hook(module, args, output):
            if slot not in static or static[slot][0].shape != output[0].shape:
                static[slot] = tuple(torch.empty_like(t) for t in output)
            for buf, t in zip(static[slot], output, strict=True):
                buf.copy_(t)
            return static[slot]
        return hook

    return [site.module.register_forward_hook(make(i)) for i, site in enumerate(layout.sites)]


def _decode_with_static_outputs(window_passes: int):
    model = build_builtin_model("olmoe-tiny", torch.device("cpu"), torch.float32)
    layout = discover_routers(model)
    handles = _static_outputs(layout)  # registered first: the capture's hooks see the static buffers
    capture = RoutingCapture(layout, window_passes=window_passes)
    layer_ids: list[np.ndarray] = []  # what each router returned, copied at once: ids [T, K] (olmoe: 3-tuple)
    handles += [site.module.register_forward_hook(lambda m, a, out: layer_ids.append(out[2].numpy().copy()))
                for site in layout.sites]
    seen: list[np.ndarray] = []
    blocks = []
    gen = torch.Generator().manual_seed(1)
    try:
        with torch.no_grad():
            for step in range(4):  # four passes of the same shape
                ids = torch.randint(0, 256, (2, 3), generator=gen)
                model(input_ids=ids)
                seen.append(np.stack(layer_ids, axis=1))  # [T, L, K]
                layer_ids.clear()
                position = torch.arange(3).expand(2, 3)
                blocks += capture.end_pass(PassTokens(np.array([0, 1]), position, ids, torch.ones((2, 3)), 0,
                                                      step))
        blocks += capture.collect()
    finally:
        for h in handles:
            h.remove()
        capture.remove()
    return blocks_to_chunk([b.release() for b in blocks], True, np.dtype(np.uint8),
                           np.dtype(np.float16)), seen


def test_static_outputs_are_refused_when_a_window_holds_passes() -> None:
    with pytest.raises(GraphRecordingError) as info:
        _decode_with_static_outputs(window_passes=3)
    assert str(info.value) == STATIC_OUTPUTS and "\n" not in STATIC_OUTPUTS


def test_static_outputs_record_exactly_one_pass_per_window() -> None:
    chunk, seen = _decode_with_static_outputs(window_passes=1)
    assert chunk.expert_ids is not None and chunk.num_tokens == 4 * 6
    np.testing.assert_array_equal(chunk.expert_ids, np.concatenate(seen))  # every pass, none stale


def test_profiler_refuses_when_the_routers_hooks_did_not_run() -> None:
    model = build_builtin_model("olmoe-tiny", torch.device("cpu"), torch.float32)
    prof = MoEProfiler(model).start()
    assert prof._capture is not None
    # what a region that skips submodule hooks does: the model runs, the routers' hooks not
    prof._capture.remove()
    with pytest.raises(GraphRecordingError, match="none of its routers' hooks did"), torch.no_grad():
        model(input_ids=torch.zeros((1, 4), dtype=torch.long))
    prof.stop()
    assert prof.chunks == []


cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.mark.gpu
@cuda
def test_cuda_graph_capture_is_refused_in_one_line() -> None:
    model = build_builtin_model("olmoe-tiny", torch.device("cuda"), torch.float32)
    prof = MoEProfiler(model).start()
    ids = torch.zeros((2, 4), dtype=torch.long, device="cuda")
    with torch.no_grad():
        model(input_ids=ids)  # warm-up on a side stream is what torch.cuda.graph expects; eager here records
        graph = torch.cuda.CUDAGraph()
        with pytest.raises(GraphRecordingError) as info, torch.cuda.graph(graph):
            model(input_ids=ids)
    assert str(info.value) == GRAPH_CAPTURE
    prof.stop()


@pytest.mark.gpu
@cuda
def test_reduce_overhead_compile_records_eager_routing_or_refuses() -> None:
    eager = _generate("cuda")
    try:
        graphs = _generate("cuda", compile_mode="reduce-overhead")
    except GraphRecordingError as exc:  # a refusal is allowed; it is one line
        assert "\n" not in str(exc)
        return
    np.testing.assert_array_equal(graphs, eager)
