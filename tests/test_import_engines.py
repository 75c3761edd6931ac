"""moe-sim import: SGLang, Megatron-Core and vLLM dumps built in the engines' layouts, checked token for
token."""

from __future__ import annotations

import json
import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from import_fixtures import Expected, megatron_trace, npy_b64, sglang_per_token, vllm_responses

from traces import open_trace
from traces.errors import InputError
from traces.importers import import_dump
from traces.validate import validate

ROOT = Path(__file__).resolve().parent.parent


def moe_sim(*args: str | Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "cli.py"), *map(str, args)], capture_output=True,
                          text=True, cwd=ROOT, timeout=300)


def assert_matches(path: Path, exp: Expected) -> None:
    validate(path)
    with open_trace(path) as trace:
        chunk = trace.read_all()
        meta = trace.metadata
    for name in ("seq_id", "position", "phase", "step", "expert_ids"):
        np.testing.assert_array_equal(getattr(chunk, name), getattr(exp, name), err_msg=name)
    if exp.token_id is not None:
        assert meta.has_token_ids
        np.testing.assert_array_equal(chunk.token_id, exp.token_id)
    if exp.expert_weights is not None:
        assert chunk.expert_weights is not None
        np.testing.assert_allclose(chunk.expert_weights, exp.expert_weights, rtol=1e-3, atol=1e-3)


def assert_one_line_error(result: subprocess.CompletedProcess, *fragments: str) -> None:
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


def test_sglang_per_token_data_parallel(tmp_path: Path) -> None:
    paths, exp = sglang_per_token(tmp_path, ranks=2, data_parallel=True)
    out = tmp_path / "t.h5"
    result = import_dump([str(p) for p in paths], out, "sglang-per-token", model="olmoe-1b-7b")
    assert result.num_tokens == exp.step.size == 2 * 13
    assert_matches(out, exp)
    with open_trace(out) as trace:
        assert trace.metadata.source == "sglang" and trace.metadata.created_at and trace.metadata.tool_version


def test_sglang_per_token_tensor_parallel_ranks_kept_once(tmp_path: Path) -> None:
    paths, exp = sglang_per_token(tmp_path, ranks=3, data_parallel=False)
    out = tmp_path / "t.arrow"
    result = moe_sim("import", *paths, "-o", out, "--from", "sglang-per-token", "--model", "olmoe", "--json")
    assert result.returncode == 0, result.stderr
    summary = json.loads(result.stdout)
    assert summary["num_tokens"] == 13 and summary["duplicate_rank_files"] == 2
    assert_matches(out, exp)


def test_sglang_bad_inputs(tmp_path: Path) -> None:
    import torch

    paths, _ = sglang_per_token(tmp_path, ranks=2)
    data = torch.load(paths[1], weights_only=True)
    out = tmp_path / "bad.h5"

    def run(name: str, payload: object, *fragments: str) -> None:
        path = tmp_path / name
        torch.save(payload, path)
        result = moe_sim("import", paths[0], path, "-o", out, "--from", "sglang-per-token",
                         "--model", "olmoe")
        assert_one_line_error(result, str(path), *fragments)
        assert not out.exists() and not (tmp_path / "bad.h5.partial").exists()

    moved = data["last_physical_to_logical_map"].clone()
    moved[0, 64] = 7
    run("maps.pt", {**data, "last_physical_to_logical_map": moved}, "disagrees")
    rec = dict(data["records"][0])
    topk = rec["topk_ids_of_layer"].clone()
    topk[2, 1, 0] = 66  # past the 66 physical experts
    run("range.pt", {**data, "records": [{**rec, "topk_ids_of_layer": topk}]}, "physical expert id 66")
    topk = rec["topk_ids_of_layer"].clone()
    topk[0, 0, 7] = -1  # this token chose 7 experts: the top-k changed
    run("topk.pt", {**data, "records": [{**rec, "topk_ids_of_layer": topk}]}, "chose 7 experts")
    run("shape.pt", {**data, "records": [{**rec, "positions": [0, 1]}]}, "disagree on the number of tokens")
    run("missing.pt", {**data, "records": [{k: v for k, v in rec.items() if k != "positions"}]},
        "'positions'")
    run("dtype.pt", {**data, "last_physical_to_logical_map": data["last_physical_to_logical_map"].float()},
        "float32")
    (tmp_path / "corrupt.pt").write_bytes(paths[1].read_bytes()[:200])
    result = moe_sim("import", tmp_path / "corrupt.pt", "-o", out, "--from", "sglang-per-token",
                     "--model", "olmoe")
    assert_one_line_error(result, "corrupt.pt", "not a readable torch file")
    result = moe_sim("import", paths[0], "-o", out, "--from", "megatron", "--model", "olmoe")
    assert_one_line_error(result, str(paths[0]), "not valid JSON")
    empty = {"records": [], "last_physical_to_logical_map": data["last_physical_to_logical_map"]}
    torch.save(empty, tmp_path / "empty.pt")
    result = moe_sim("import", tmp_path / "empty.pt", "-o", out, "--from", "sglang-per-token",
                     "--model", "olmoe")
    assert_one_line_error(result, "empty.pt", "no routed tokens")
    assert not out.exists()


class _RunsCode:
    def __reduce__(self):  # unpickling this calls open() on a marker file: code execution
        return (open, (str(MARKER), "w"))


MARKER = Path("/tmp/moe-trace-hostile-pickle-ran")


def test_hostile_pickle_is_refused_and_never_runs(tmp_path: Path) -> None:
    MARKER.unlink(missing_ok=True)
    path = tmp_path / "hostile.pt"
    with open(path, "wb") as fh:
        pickle.dump({"records": [_RunsCode()], "last_physical_to_logical_map": [[0]]}, fh)
    result = moe_sim("import", path, "-o", tmp_path / "x.h5", "--from", "sglang-per-token",
                     "--model", "olmoe")
    assert_one_line_error(result, "hostile.pt", "refused")
    assert not MARKER.exists()
    assert not (tmp_path / "x.h5").exists()


def test_megatron_router_trace(tmp_path: Path) -> None:
    paths, exp = megatron_trace(tmp_path, ranks=2, steps=3)
    out = tmp_path / "m.h5"
    result = moe_sim("import", tmp_path, "-o", out, "--from", "megatron", "--model", "olmoe", "--json")
    assert result.returncode == 0, result.stderr
    summary = json.loads(result.stdout)
    assert summary["num_tokens"] == 24 and summary["skipped_mtp_records"] == 6
    assert_matches(out, exp)


def test_megatron_bad_inputs(tmp_path: Path) -> None:
    paths, _ = megatron_trace(tmp_path, ranks=1, steps=2, with_mtp=False)
    lines = paths[0].read_text().splitlines()
    out = tmp_path / "m.h5"

    def run(text: str, *fragments: str) -> None:
        bad = tmp_path / "bad" / "router_trace_rank0.jsonl"
        bad.parent.mkdir(exist_ok=True)
        bad.write_text(text)
        result = moe_sim("import", bad, "-o", out, "--from", "megatron", "--model", "olmoe")
        assert_one_line_error(result, str(bad), *fragments)
        assert not out.exists()

    rec = json.loads(lines[3])
    run("\n".join(lines[:3] + [json.dumps({**rec, "topk": 4})] + lines[4:]), "line 4", "topk 4")
    rec2 = {**rec, "top_indices": [[99] * 8] * rec["num_tokens"]}
    run("\n".join(lines[:3] + [json.dumps(rec2)] + lines[4:]), "expert id 99")
    run("\n".join(lines[:3] + lines[4:]), "no record for MoE layer 3")
    run("\n".join(lines[:3] + [json.dumps({k: v for k, v in rec.items() if k != "num_tokens"})]),
        "'num_tokens'")
    run("\n".join(lines[:5]) + "\n{\"step\": 1, trunc", "not valid JSON")
    run("", "no routed tokens")


def test_vllm_responses(tmp_path: Path) -> None:
    paths, exp = vllm_responses(tmp_path / "responses.jsonl")
    out = tmp_path / "v.h5"
    result = import_dump([str(p) for p in paths], out, "vllm", model="olmoe-1b-7b")
    assert result.details["requests"] == 2
    assert_matches(out, exp)


def test_vllm_offline_outputs_and_bad_inputs(tmp_path: Path) -> None:
    rng = np.random.default_rng(5)
    ids = np.argsort(rng.random((4, 16, 64)), axis=-1)[..., :8]
    offline = tmp_path / "offline.json"
    offline.write_text(json.dumps([{"prompt_token_ids": [1, 2, 3], "outputs": [
        {"token_ids": [7, 8], "routed_experts": ids.tolist()}]}]))
    out = tmp_path / "o.h5"
    import_dump([str(offline)], out, "vllm", model="olmoe")
    with open_trace(out) as trace:
        chunk = trace.read_all()
    np.testing.assert_array_equal(chunk.expert_ids, ids)
    np.testing.assert_array_equal(chunk.phase, [0, 0, 0, 1])
    np.testing.assert_array_equal(chunk.token_id, [1, 2, 3, 7])
    bad = tmp_path / "bad.json"
    for payload, fragment in (
        ({"choices": [{"routed_experts": npy_b64(ids[:, :, :4])}], "usage": {"prompt_tokens": 3}},
         "top-k is 8"),
        ({"choices": [{"routed_experts": "@@@"}], "usage": {"prompt_tokens": 3}}, "base64"),
        ({"choices": [{"routed_experts": npy_b64(ids + 60)}], "usage": {"prompt_tokens": 3}}, "out of range"),
        ({"choices": [{"routed_experts": ids.tolist()}]}, "no prompt length"),
        ({"data": []}, "'choices'"),
    ):
        bad.write_text(json.dumps(payload))
        with pytest.raises(InputError, match=fragment):
            import_dump([str(bad)], tmp_path / "b.h5", "vllm", model="olmoe")
        assert not (tmp_path / "b.h5").exists() and not (tmp_path / "b.h5.partial").exists()


def test_megatron_tensor_parallel_rank_files_read_once(tmp_path: Path) -> None:
    paths, exp = megatron_trace(tmp_path, ranks=1, steps=2)
    peer = tmp_path / "router_trace_rank1.jsonl"
    peer.write_text(paths[0].read_text().replace('"rank": 0', '"rank": 1'))
    out = tmp_path / "m.h5"
    result = import_dump([str(tmp_path)], out, "megatron", model="olmoe")
    assert result.details["duplicate_rank_files"] == 1
    assert_matches(out, exp)
