"""record(): token accounting, positions with left padding, decode phases/steps, batch invariance, inputs."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from rich.console import Console

from recorder.builtin_models import build_builtin_model, build_builtin_tokenizer
from recorder.config import RecordConfig
from recorder.record import record
from recorder.routers import discover_routers
from traces import InputError, open_trace
from traces.schema import PHASE_DECODE, PHASE_PREFILL

PROMPTS = [
    "The quick brown fox.",
    "Mixture of experts models route every token to a few experts.",
    "Hi",
    "A somewhat longer prompt that needs padding on its neighbours in the batch.",
    "Short one.",
]


def _write(path: Path, lines: list[str]) -> Path:
    path.write_text("\n".join(lines) + "\n")
    return path


def _record(tmp_path: Path, name: str = "t.h5", console: Console | None = None, **kw) -> Path:
    prompts = kw.pop("prompts", None) or _write(tmp_path / "p.txt", PROMPTS)
    kw.setdefault("device", "cpu")  # the same arithmetic on machines with a GPU
    cfg = RecordConfig(prompts=prompts, output=tmp_path / name, progress=False, **kw)
    result = record(cfg, console or Console(file=io.StringIO()))
    return result.path


def _by_token(path: Path):
    with open_trace(path) as t:
        c = t.read_all()
    assert c.position is not None and c.seq_id is not None
    order = np.lexsort((c.position, c.seq_id))
    return {k: v[order] for k, v in c.present().items()}, t.metadata


def test_tokens_positions_phases_and_steps(tmp_path: Path) -> None:
    path = _record(tmp_path, batch_size=3, max_new_tokens=3)
    cols, meta = _by_token(path)
    tok = build_builtin_tokenizer()
    lengths = [len(tok(p)["input_ids"]) for p in PROMPTS]
    assert meta.status == "complete" and meta.has_token_ids and meta.notes["max_new_tokens"] == 3
    # Padding is never recorded: prompt tokens (the attention mask's sum) plus 3 generated tokens per prompt.
    assert len(cols["seq_id"]) == sum(lengths) + 3 * len(PROMPTS)
    start = 0
    for seq, n in enumerate(lengths):
        rows = slice(start, start + n + 3)
        start += n + 3
        assert (cols["seq_id"][rows] == seq).all()
        np.testing.assert_array_equal(cols["position"][rows], np.arange(n + 3))  # left padding does not shift
        np.testing.assert_array_equal(cols["phase"][rows], [PHASE_PREFILL] * n + [PHASE_DECODE] * 3)
        np.testing.assert_array_equal(cols["token_id"][rows][:n], tok(PROMPTS[seq])["input_ids"])
        steps = cols["step"][rows]
        assert len(set(steps[:n])) == 1 and list(np.diff(steps[n:])) == [1, 1] and steps[n] == steps[0] + 1
    # Batches of 3: prompts 0-2 share a prefill step, prompts 3-4 the step after that batch's decode steps.
    steps0 = cols["step"][cols["seq_id"] == 0]
    steps3 = cols["step"][cols["seq_id"] == 3]
    assert steps0[0] == 0 and steps3[0] == 4


def test_decode_tokens_are_greedy_continuations_of_the_unpadded_prompt(tmp_path: Path) -> None:
    path = _record(tmp_path, batch_size=5, max_new_tokens=2)
    cols, _ = _by_token(path)
    model = build_builtin_model("olmoe-tiny", torch.device("cpu"), torch.float32)
    tok = build_builtin_tokenizer()
    for seq, text in enumerate(PROMPTS):
        ids = tok(text)["input_ids"]
        with torch.no_grad():
            nxt = int(model(input_ids=torch.tensor([ids])).logits[0, -1].argmax())
        mine = cols["token_id"][(cols["seq_id"] == seq) & (cols["phase"] == PHASE_DECODE)]
        assert mine[0] == nxt


def test_batch_size_does_not_change_routing(tmp_path: Path) -> None:
    one, _ = _by_token(_record(tmp_path, "b1.h5", batch_size=1, max_new_tokens=2))
    eight, _ = _by_token(_record(tmp_path, "b8.h5", batch_size=8, max_new_tokens=2))
    for key in ("seq_id", "position", "phase", "token_id"):
        np.testing.assert_array_equal(one[key], eight[key])
    np.testing.assert_array_equal(one["expert_ids"], eight["expert_ids"])
    np.testing.assert_allclose(one["expert_weights"], eight["expert_weights"], atol=1e-3)


def test_no_token_ids_and_logits(tmp_path: Path) -> None:
    path = _record(tmp_path, token_ids=False, save_logits=True)
    with h5py.File(path) as f:
        assert "token_id" not in f and "router_logits" in f
    cols, meta = _by_token(path)
    assert not meta.has_token_ids and meta.has_logits and meta.router_first_output == "logits"
    # The stored logits give back the stored top-k (softmax is monotonic).
    top = np.argsort(-cols["router_logits"].astype(np.float32), axis=-1, kind="stable")[..., :meta.top_k]
    agree = (np.sort(top, -1) == np.sort(cols["expert_ids"], -1)).mean()
    assert agree > 0.99  # float16 logits can swap near-ties


def test_metadata_describes_model_and_run(tmp_path: Path) -> None:
    _, meta = _by_token(_record(tmp_path, model="deepseek-tiny", max_new_tokens=1))
    assert meta.model_id == "deepseek-tiny" and meta.model_type == "deepseek_v3"
    assert meta.moe_layers == [1, 2] and meta.num_hidden_layers == 3 and meta.dense_intermediate_size == 96
    assert meta.moe_module_names == ["model.layers.1.mlp.gate", "model.layers.2.mlp.gate"]
    assert (meta.router_scoring, meta.routed_scaling_factor, meta.norm_topk_prob) == ("sigmoid", 2.5, True)
    assert (meta.num_shared_experts, meta.shared_expert_intermediate_size,
            meta.expert_intermediate_size) == (1, 32, 32)
    assert meta.prompts_sha256 and meta.transformers_version and meta.torch_version and meta.created_at
    assert meta.model_dtype == "float32" and meta.notes["router_convention"] == "3-tuple"


def test_arrow_output_and_qwen_dense_layers(tmp_path: Path) -> None:
    path = _record(tmp_path, "t.arrow", model="qwen-moe-tiny")
    cols, meta = _by_token(path)
    assert (meta.moe_layers == [1, 3] and meta.num_shared_experts == 1
            and meta.shared_expert_intermediate_size == 48)
    assert cols["expert_ids"].shape[1:] == (2, 3)


def test_jsonl_text_messages_field_blank_and_truncation(tmp_path: Path) -> None:
    lines = [json.dumps({"prompt": "plain text prompt"}), "",
             json.dumps({"messages": [{"role": "user", "content": "hello"}]}),
             json.dumps({"prompt": "x" * 50})]
    prompts = _write(tmp_path / "p.jsonl", lines)
    out = io.StringIO()
    cfg = RecordConfig(prompts=prompts, output=tmp_path / "t.h5", progress=False, prompt_field="prompt",
                       max_length=20, device="cpu")
    result = record(cfg, Console(file=out))
    assert result.truncated == 2 and result.blank_lines == 1
    cols, _ = _by_token(result.path)
    tok = build_builtin_tokenizer()
    chat = tok.apply_chat_template([{"role": "user", "content": "hello"}], tokenize=False,
                                   add_generation_prompt=True)
    assert bytes(cols["token_id"][cols["seq_id"] == 1][:20].astype(np.uint8)) == chat.encode()[:20]
    assert (np.bincount(cols["seq_id"]) == [17, 20, 20]).all()


def test_model_without_moe_is_a_clear_error() -> None:
    from transformers import AutoModelForCausalLM, LlamaConfig

    dense = AutoModelForCausalLM.from_config(LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64,
                                                         num_hidden_layers=1, num_attention_heads=2))
    with pytest.raises(InputError, match="no MoE router"):
        discover_routers(dense)


@pytest.mark.parametrize("content,match", [
    (None, "no such prompts file"), ("", "no prompts"), ("\n\n  \n", "no prompts"),
])
def test_bad_prompt_files(tmp_path: Path, content: str | None, match: str) -> None:
    prompts = tmp_path / "p.txt"
    if content is not None:
        prompts.write_text(content)
    with pytest.raises(InputError, match=match):
        _record(tmp_path, prompts=prompts)


def test_bad_jsonl_and_options(tmp_path: Path) -> None:
    bad = _write(tmp_path / "p.jsonl", ['{"text": "ok"}', "{not json"])
    with pytest.raises(InputError, match=r"p.jsonl:2: not valid JSON"):
        _record(tmp_path, prompts=bad)
    nofield = _write(tmp_path / "q.jsonl", ['{"body": "ok"}'])
    with pytest.raises(InputError, match="no 'text' field"):
        _record(tmp_path, prompts=nofield)
    with pytest.raises(InputError, match="unsupported trace extension"):
        _record(tmp_path, "t.csv")
    empty_dir = tmp_path / "not-a-model"
    empty_dir.mkdir()
    with pytest.raises(InputError, match="no config.json in this folder"):
        _record(tmp_path, model=str(empty_dir))
    (empty_dir / "config.json").write_text("{}")  # a config without model_type
    with pytest.raises(InputError, match="cannot read its config"):
        _record(tmp_path, model=str(empty_dir))
    build_builtin_model("olmoe-tiny", torch.device("cpu"), torch.float32).config.save_pretrained(empty_dir)
    with pytest.raises(InputError, match="cannot load"):  # a config, but no weights or tokenizer
        _record(tmp_path, model=str(empty_dir))


def test_never_overwrites_without_force(tmp_path: Path) -> None:
    path = _record(tmp_path)
    before = path.read_bytes()
    with pytest.raises(InputError, match="already exists"):
        _record(tmp_path)
    assert path.read_bytes() == before
    _record(tmp_path, force=True, max_new_tokens=1)
    assert path.read_bytes() != before


def _cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    code = "import sys, cli; sys.argv[0] = 'moe-rec'; cli.moe_rec()"
    root = Path(__file__).resolve().parent.parent
    return subprocess.run([sys.executable, "-c", code, *args], cwd=cwd, capture_output=True, text=True,
                          env={"PYTHONPATH": os.pathsep.join([str(root), os.environ.get("PYTHONPATH", "")]),
                               "PATH": "/usr/bin:/bin", "HOME": str(cwd)}, timeout=300)


def test_cli_record_and_errors(tmp_path: Path) -> None:
    _write(tmp_path / "p.txt", PROMPTS)
    ok = _cli("record", "--prompts", "p.txt", "--max-new-tokens", "2", "--device", "cpu", cwd=tmp_path)
    assert ok.returncode == 0, ok.stderr
    assert "bytes/token" in ok.stdout and "trace.h5" in ok.stdout
    with open_trace(tmp_path / "trace.h5") as t:
        assert t.metadata.command_line.startswith("moe-rec record --prompts p.txt")
    again = _cli("record", "--prompts", "p.txt", cwd=tmp_path)
    assert again.returncode == 2 and "already exists" in again.stderr and "Traceback" not in again.stderr
    missing = _cli("record", "--prompts", "nope.txt", "-o", "x.h5", cwd=tmp_path)
    assert missing.returncode == 2 and "error: nope.txt: no such prompts file" in missing.stderr
    helped = _cli("record", "--help", cwd=tmp_path)
    assert "--max-new-tokens" in helped.stdout and "--no-token-ids" in helped.stdout
