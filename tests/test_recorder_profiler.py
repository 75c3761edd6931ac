"""MoEProfiler: start/stop and `with`, generate() phases, summary, save, remove."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import torch
from rich.console import Console

from recorder import MoEProfiler
from recorder.builtin_models import build_builtin_model, build_builtin_tokenizer
from traces import open_trace
from traces.schema import PHASE_DECODE, PHASE_PREFILL


def test_profiler_records_generate_and_saves(tmp_path: Path) -> None:
    model = build_builtin_model("mixtral-tiny", torch.device("cpu"), torch.float32)
    tok = build_builtin_tokenizer()
    enc = tok(["short", "a longer prompt here"], return_tensors="pt", padding=True)
    prof = MoEProfiler(model)
    assert len(prof.layout.sites) == 3
    with prof:
        model.generate(**enc, max_new_tokens=4, do_sample=False, pad_token_id=tok.pad_token_id)
    chunk = prof.trace()
    real = int(enc["attention_mask"].sum())
    # 4 new tokens: generate() feeds 3 of them back (the 4th is never run through the model).
    assert chunk.num_tokens == real + 2 * 3
    assert chunk.phase is not None and chunk.position is not None and chunk.seq_id is not None
    assert (chunk.phase[:real] == PHASE_PREFILL).all() and (chunk.phase[real:] == PHASE_DECODE).all()
    for seq, n in enumerate(enc["attention_mask"].sum(1).tolist()):
        np.testing.assert_array_equal(chunk.position[chunk.seq_id == seq], np.arange(n + 3))
    counts = prof.expert_counts()
    assert counts.shape == (3, 8) and (counts.sum(1) == chunk.num_tokens * 2).all()

    out = io.StringIO()
    prof.print_summary(Console(file=out, width=200))
    text = out.getvalue()
    assert "model.layers.2.mlp.gate" in text and "max/mean" in text
    path = prof.save(tmp_path / "p.h5")
    with open_trace(path) as t:
        assert (t.metadata.model_type == "mixtral" and t.metadata.norm_topk_prob
                and t.num_tokens == chunk.num_tokens)
        np.testing.assert_array_equal(t.read_all(["expert_ids"]).expert_ids, chunk.expert_ids)


def test_remove_detaches_every_hook_and_start_stop_accumulate() -> None:
    model = build_builtin_model("olmoe-tiny", torch.device("cpu"), torch.float32)
    ids = torch.randint(0, 256, (1, 8), generator=torch.Generator().manual_seed(0))
    prof = MoEProfiler(model).start()
    with torch.no_grad():
        model(input_ids=ids)
    prof.stop()
    with torch.no_grad():
        model(input_ids=ids)  # not recorded
    prof.start()
    with torch.no_grad():
        model(input_ids=ids)
    prof.remove()
    chunk = prof.trace()
    assert chunk.num_tokens == 16 and chunk.seq_id is not None and chunk.step is not None
    # The unrecorded pass in between is not counted: two sequences, two steps.
    assert chunk.seq_id.tolist() == [0] * 8 + [1] * 8 and chunk.step.tolist() == [0] * 8 + [1] * 8
    hooks = [m for m in model.modules() if m._forward_hooks or m._forward_pre_hooks]
    assert hooks == []
