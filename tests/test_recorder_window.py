"""Windows of passes: one device->host copy for many passes must record exactly what one copy per pass
records."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
import torch
from rich.console import Console

import recorder.record as record_module
from recorder.blocks import HostBlock, blocks_to_chunk
from recorder.builtin_models import build_builtin_model
from recorder.capture import PassTokens, RoutingCapture
from recorder.config import RecordConfig
from recorder.record import forward_kwargs, output_cache, record
from recorder.routers import discover_routers
from traces import open_trace


def _decode_run(window_passes: int, window_bytes: int = 64 << 20):
    """A prefill of 3 left-padded rows, then 7 single-token passes with a finished row; blocks and router
    outputs."""
    model = build_builtin_model("olmoe-tiny", torch.device("cpu"), torch.float32)
    layout = discover_routers(model)
    capture = RoutingCapture(layout, save_logits=True, window_passes=window_passes, window_bytes=window_bytes)
    seen: list[list[tuple[np.ndarray, np.ndarray]]] = [[] for _ in range(layout.num_layers)]

    def tap(i: int):
        return lambda m, a, out: seen[i].append((out[2].numpy().copy(), out[1].numpy().copy()))

    cache_arg, _ = forward_kwargs(model)
    taps = [s.module.register_forward_hook(tap(i)) for i, s in enumerate(layout.sites)]
    gen = torch.Generator().manual_seed(3)
    ids = torch.randint(0, 256, (3, 5), generator=gen)
    mask = torch.ones((3, 5), dtype=torch.long)
    mask[1, :2] = 0  # left padding
    position = (mask.cumsum(1) - 1).clamp(min=0)
    blocks: list[HostBlock] = []
    valid_rows = []
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=mask, position_ids=position, use_cache=True)
        blocks += capture.end_pass(PassTokens(np.array([7, 8, 9]), position, ids, mask, 0, 0))
        valid_rows.append(mask.reshape(-1).bool().numpy())
        cache = output_cache(out)
        for j in range(7):
            nxt = out.logits[:, -1].argmax(-1)[:, None]
            mask = torch.cat([mask, torch.ones((3, 1), dtype=torch.long)], dim=1)
            pos = position[:, -1:] + j + 1
            out = model(input_ids=nxt, attention_mask=mask, position_ids=pos, use_cache=True,
                        **{cache_arg: cache})
            valid = torch.tensor([[True], [j < 4], [True]])  # row 1 finished after 4 tokens
            blocks += capture.end_pass(PassTokens(np.array([7, 8, 9]), pos, nxt, valid, 1, j + 1))
            valid_rows.append(valid.reshape(-1).numpy())
            cache = output_cache(out)
    blocks += capture.collect()
    for t in taps:
        t.remove()
    capture.remove()
    chunk = blocks_to_chunk([b.release() for b in blocks], True, np.dtype(np.uint8), np.dtype(np.float16))
    return blocks, chunk, seen, np.concatenate(valid_rows)


@pytest.mark.parametrize("window", [1, 3, 64])
def test_window_records_the_router_outputs_of_every_pass(window: int) -> None:
    blocks, chunk, seen, valid = _decode_run(window)
    # The prefill is its own block (the shape changes); decode passes fill windows of `window` passes.
    assert [b.num_passes for b in blocks] == [1] + [min(window, 7 - i) for i in range(0, 7, window)]
    assert chunk.num_tokens == int(valid.sum()) == 13 + 3 * 7 - 3
    np.testing.assert_array_equal(chunk.step, np.repeat(np.arange(8), [13] + [3] * 4 + [2] * 3))
    np.testing.assert_array_equal(chunk.phase, (chunk.step > 0).astype(np.uint8))
    assert chunk.expert_ids is not None and chunk.expert_weights is not None
    for i, layer in enumerate(seen):
        ids = np.concatenate([s[0] for s in layer])[valid]
        weights = np.concatenate([s[1] for s in layer])[valid]
        np.testing.assert_array_equal(chunk.expert_ids[:, i], ids)
        np.testing.assert_array_equal(chunk.expert_weights[:, i], weights.astype(np.float16))
    np.testing.assert_array_equal(chunk.seq_id[-2:], [7, 9])


def test_window_bytes_bound_what_the_window_keeps_alive() -> None:
    blocks, chunk, _, _ = _decode_run(64, window_bytes=1)  # every pass is over budget: one block each
    assert [b.num_passes for b in blocks] == [1] * 8
    _, reference, _, _ = _decode_run(1)
    for name, value in reference.present().items():
        np.testing.assert_array_equal(getattr(chunk, name), value, err_msg=name)


def test_clear_drops_uncollected_passes() -> None:
    model = build_builtin_model("olmoe-tiny", torch.device("cpu"), torch.float32)
    capture = RoutingCapture(discover_routers(model), window_passes=4)
    ids = torch.randint(0, 256, (2, 3))
    with torch.no_grad():
        model(input_ids=ids)
    tokens = PassTokens(np.arange(2), torch.arange(3).expand(2, 3), ids, torch.ones((2, 3), dtype=torch.bool),
                        0, 0)
    assert capture.end_pass(tokens) == [] and capture.window_size == 1
    capture.clear()
    assert capture.window_size == 0 and capture.collect() == []
    with pytest.raises(RuntimeError, match="routers did not run"):
        capture.end_pass(tokens)
    capture.remove()


def test_record_with_small_windows_equals_one_copy_per_pass(tmp_path: Path,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    prompts = tmp_path / "p.txt"
    prompts.write_text("\n".join(f"prompt {i} " + "y" * (i * 5 % 17) for i in range(7)) + "\n")

    def run(window: int) -> dict[str, np.ndarray]:
        monkeypatch.setattr(record_module, "WINDOW_PASSES", window)
        out = record(RecordConfig(prompts=prompts, output=tmp_path / f"w{window}.h5", batch_size=3,
                                  max_new_tokens=6, save_logits=True, device="cpu", progress=False),
                     Console(file=io.StringIO()))
        with open_trace(out.path) as t:
            return t.read_all().present()

    reference = run(1)
    for window in (4, 64):
        got = run(window)
        assert got.keys() == reference.keys()
        for name, value in reference.items():
            np.testing.assert_array_equal(got[name], value, err_msg=f"{name} (window {window})")


def test_profiler_with_a_window_records_generate_as_with_one_copy_per_pass() -> None:
    from recorder import MoEProfiler
    from recorder.builtin_models import build_builtin_tokenizer

    model = build_builtin_model("mixtral-tiny", torch.device("cpu"), torch.float32)
    tok = build_builtin_tokenizer()
    enc = tok(["short", "a longer prompt here"], return_tensors="pt", padding=True)
    chunks = []
    for window in (1, 4):
        prof = MoEProfiler(model, window_passes=window)
        with prof:
            model.generate(**enc, max_new_tokens=7, do_sample=False, pad_token_id=tok.pad_token_id)
        chunks.append(prof.trace())
        prof.remove()
    assert chunks[0].num_tokens == int(enc["attention_mask"].sum()) + 2 * 6
    for name, value in chunks[0].present().items():
        np.testing.assert_array_equal(getattr(chunks[1], name), value, err_msg=name)
