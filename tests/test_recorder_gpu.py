"""The GPU path: device buffers, pinned non-blocking copies, events, writer thread, no host sync, OOM
split."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
import torch
from rich.console import Console

from recorder import MoEProfiler
from recorder.builtin_models import build_builtin_model
from recorder.capture import PassTokens, RoutingCapture
from recorder.config import RecordConfig
from recorder.record import BatchRunner, record
from recorder.sink import TraceSink
from traces import open_trace

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]
CUDA = torch.device("cuda")


def _router_outputs(prof: MoEProfiler):
    """The routers' own outputs, fetched by a test hook (which may synchronise; the recorder must not)."""
    seen: dict[int, list[tuple[np.ndarray, np.ndarray]]] = {i: [] for i in range(prof.layout.num_layers)}

    def tap(i):
        return lambda m, a, out: seen[i].append((out[2].cpu().numpy(), out[1].float().cpu().numpy()))

    return seen, [s.module.register_forward_hook(tap(i)) for i, s in enumerate(prof.layout.sites)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_recording_equals_router_outputs(dtype: torch.dtype) -> None:
    model = build_builtin_model("olmoe-tiny", CUDA, dtype)
    prof = MoEProfiler(model)
    seen, taps = _router_outputs(prof)
    gen = torch.Generator().manual_seed(0)
    with prof, torch.no_grad():
        for _ in range(3):
            model(input_ids=torch.randint(0, 256, (4, 33), generator=gen).to(CUDA))
    for t in taps:
        t.remove()
    chunk = prof.trace()
    assert chunk.expert_ids is not None and chunk.expert_weights is not None
    for i in range(prof.layout.num_layers):
        ids = np.concatenate([s[0] for s in seen[i]])
        w = np.concatenate([s[1] for s in seen[i]])
        np.testing.assert_array_equal(chunk.expert_ids[:, i], ids)
        np.testing.assert_allclose(chunk.expert_weights[:, i], w, atol=1e-3)


def test_end_pass_and_collect_use_pinned_buffers_and_never_synchronise() -> None:
    model = build_builtin_model("olmoe-tiny", CUDA, torch.bfloat16)
    prof = MoEProfiler(model)
    capture = RoutingCapture(prof.layout, save_logits=True, window_passes=3)
    seen, taps = _router_outputs(prof)
    gen = torch.Generator().manual_seed(1)
    all_ids, blocks = [], []
    with torch.no_grad():
        for step in range(3):  # a full window: the third end_pass starts the block's copy
            ids = torch.randint(0, 256, (8, 64), generator=gen).to(CUDA)
            all_ids.append(ids.cpu().numpy().reshape(-1))
            model(input_ids=ids)
            torch.cuda.synchronize()
            tokens = PassTokens(np.arange(8), torch.arange(64, device=CUDA).expand(8, 64), ids,
                                torch.ones((8, 64), dtype=torch.bool, device=CUDA), 0, step)
            torch.cuda.set_sync_debug_mode("error")  # any host synchronisation below raises
            try:
                blocks += capture.end_pass(tokens)
            finally:
                torch.cuda.set_sync_debug_mode("default")
            assert len(blocks) == (1 if step == 2 else 0) and capture.window_size == (0 if step == 2
                                                                                      else step + 1)
    for t in taps:
        t.remove()
    host = blocks[0]
    assert host.event is not None and host.data is not None and host.data.is_pinned() and host.num_passes == 3
    chunk = host.to_chunk(True, np.dtype(np.uint8), np.dtype(np.float16))  # waits for the copy
    # [N, T, L, K]
    assert host.field("ids").shape == (3, 8 * 64, 4, 4) and host.field("ids").dtype == np.uint8
    np.testing.assert_array_equal(chunk.token_id, np.concatenate(all_ids))
    np.testing.assert_array_equal(chunk.step, np.repeat([0, 1, 2], 512))
    assert chunk.expert_ids is not None and chunk.expert_weights is not None
    for i in range(prof.layout.num_layers):
        np.testing.assert_array_equal(chunk.expert_ids[:, i], np.concatenate([s[0] for s in seen[i]]))
        np.testing.assert_allclose(chunk.expert_weights[:, i], np.concatenate([s[1] for s in seen[i]]),
                                   atol=1e-3)
    assert (chunk.num_tokens == 1536 and chunk.router_logits is not None
            and chunk.router_logits.shape == (1536, 4, 16))
    assert capture.collect() == []
    capture.remove()


def test_writer_back_pressure_keeps_everything(tmp_path: Path) -> None:
    model = build_builtin_model("olmoe-tiny", CUDA, torch.bfloat16)
    prof = MoEProfiler(model)
    capture = RoutingCapture(prof.layout)
    sink = TraceSink(None, with_token_ids=True, id_dtype=np.dtype(np.uint8),
                     weights_dtype=np.dtype(np.float16),
                     max_bytes=1)  # at most one batch in flight
    expected = []
    with torch.no_grad():
        for step in range(20):
            ids = torch.randint(0, 256, (2, 16), device=CUDA)
            model(input_ids=ids)
            expected.append(ids.cpu().numpy().reshape(-1))
            valid = torch.ones((2, 16), dtype=torch.bool, device=CUDA)
            pos = torch.arange(16, device=CUDA).expand(2, 16)
            blocks = capture.end_pass(PassTokens(np.arange(2), pos, ids, valid, 0, step)) + capture.collect()
            sink.submit(blocks, 2)
    sink.close()
    capture.remove()
    got = np.concatenate([c.token_id for c in sink.chunks if c.token_id is not None])
    np.testing.assert_array_equal(got, np.concatenate(expected))
    assert sink.batches_written == 20


def test_cuda_record_end_to_end_with_oom_split(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    prompts = tmp_path / "p.txt"
    prompts.write_text("\n".join(f"prompt {i} " + "x" * (i * 7 % 50) for i in range(12)) + "\n")
    ref = record(RecordConfig(prompts=prompts, output=tmp_path / "ref.h5", batch_size=4, max_new_tokens=3,
                              device="cuda", dtype="fp32", progress=False), Console(file=io.StringIO()))
    cpu = record(RecordConfig(prompts=prompts, output=tmp_path / "cpu.h5", batch_size=4, max_new_tokens=3,
                              device="cpu", progress=False), Console(file=io.StringIO()))
    original = BatchRunner._forward

    def small_memory(self, **kwargs):
        if kwargs["input_ids"].shape[0] > 2:
            raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
        return original(self, **kwargs)

    monkeypatch.setattr(BatchRunner, "_forward", small_memory)
    log = io.StringIO()
    split = record(RecordConfig(prompts=prompts, output=tmp_path / "split.h5", batch_size=4, max_new_tokens=3,
                                device="cuda", dtype="fp32", progress=False), Console(file=log, width=200))
    assert split.oom_splits >= 1 and "splitting into 2 + 2" in log.getvalue()

    def rows(path: Path):
        with open_trace(path) as t:
            c = t.read_all()
        assert c.position is not None and c.seq_id is not None
        assert c.expert_ids is not None and c.token_id is not None
        order = np.lexsort((c.position, c.seq_id))
        return c.expert_ids[order], c.token_id[order]

    ref_ids, ref_tok = rows(ref.path)
    ids, tok = rows(split.path)
    np.testing.assert_array_equal(tok, ref_tok)
    np.testing.assert_array_equal(ids, ref_ids)
    # Built-in weights are the same on CPU and GPU; the arithmetic differs, so allow a rare near-tie swap.
    ids, tok = rows(cpu.path)
    assert (tok == ref_tok).mean() > 0.98 and (ids == ref_ids).mean() > 0.99
