"""moe-sim import --from tabular (JSONL, CSV, Parquet) and --from hf-router-logits (safetensors, top-k
recomputed)."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
from import_fixtures import tabular_rows
from test_import_engines import assert_matches

from recorder.reference import reference_routing
from traces import open_trace
from traces.errors import InputError
from traces.importers import ImportOptions, import_dump
from traces.importers.tabular import Columns

WEIGHTED = ImportOptions(columns=Columns(weights="topk_weights"))


def test_tabular_jsonl_csv_parquet(tmp_path: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows, exp = tabular_rows()
    jsonl = tmp_path / "dump.jsonl"
    jsonl.write_text("".join(json.dumps(r) + "\n" for r in rows))
    with open(tmp_path / "dump.csv", "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
        writer.writeheader()
        for r in rows:
            writer.writerow({**r, "topk_ids": json.dumps(r["topk_ids"]),
                             "topk_weights": " ".join(repr(w) for w in r["topk_weights"])})
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "dump.parquet")
    for name in ("dump.jsonl", "dump.csv", "dump.parquet"):
        out = tmp_path / f"{name}.h5"
        result = import_dump([str(tmp_path / name)], out, "tabular", model="olmoe", options=WEIGHTED)
        assert result.details["sequences"] == 3
        assert_matches(out, exp)


def test_tabular_per_token_form_with_phases(tmp_path: Path) -> None:
    rng = np.random.default_rng(8)
    ids = np.argsort(rng.random((5, 16, 64)), axis=-1)[..., :8]
    phases = ["prefill", "prefill", "prefill", "decode", "decode"]
    path = tmp_path / "tokens.jsonl"
    path.write_text("".join(json.dumps({"seq": 7, "pos": t, "experts": ids[t].tolist(), "phase": phases[t],
                                        "tok": 40 + t}) + "\n" for t in range(5)))
    cols = Columns(seq="seq", layer="", position="pos", experts="experts", phase="phase", token="tok")
    out = tmp_path / "t.h5"
    import_dump([str(path)], out, "tabular", model="olmoe", options=ImportOptions(columns=cols))
    with open_trace(out) as trace:
        chunk = trace.read_all()
    np.testing.assert_array_equal(chunk.expert_ids, ids)
    np.testing.assert_array_equal(chunk.phase, [0, 0, 0, 1, 1])
    np.testing.assert_array_equal(chunk.step, [0, 0, 0, 1, 2])
    np.testing.assert_array_equal(chunk.token_id, 40 + np.arange(5))


def test_tabular_bad_inputs(tmp_path: Path) -> None:
    rows, _ = tabular_rows(sequences=2, tokens=2)
    path = tmp_path / "bad.jsonl"
    out = tmp_path / "b.h5"
    cases = [
        (rows[:5] + rows[6:], "no row for MoE layer"),
        ([{**rows[0], "topk_ids": rows[0]["topk_ids"][:3]}] + rows[1:], "line 1: column .topk_ids."),
        ([{k: v for k, v in rows[0].items() if k != "layer"}] + rows[1:], "missing column 'layer'"),
        (rows + rows[:1], "not together"),
        ([{**rows[0], "layer": 40}] + rows[1:], "layer 40"),
        ([], "no routed tokens"),
    ]
    for table, fragment in cases:
        path.write_text("".join(json.dumps(r) + "\n" for r in table))
        with pytest.raises(InputError, match=fragment):
            import_dump([str(path)], out, "tabular", model="olmoe", options=WEIGHTED)
        assert not out.exists() and not (tmp_path / "b.h5.partial").exists()
    (tmp_path / "bad.parquet").write_bytes(b"PAR1 not really")
    with pytest.raises(InputError, match="Parquet"):
        import_dump([str(tmp_path / "bad.parquet")], out, "tabular", model="olmoe")


@pytest.mark.parametrize("model", ["olmoe-1b-7b", "mixtral-8x7b"])
def test_hf_router_logits_recomputes_top_k(tmp_path: Path, model: str) -> None:
    import torch
    from safetensors.torch import save_file

    from traces.presets import get_preset

    p = get_preset(model)
    rng = np.random.default_rng(4)
    b, s = 2, 5
    logits = rng.normal(size=(p.num_hidden_layers, b * s, p.num_experts)).astype(np.float32)
    mask = np.ones((b, s), dtype=np.int64)
    mask[1, :2] = 0  # left padding of the second prompt
    tensors = {f"router_logits.{i}": torch.from_numpy(logits[i]) for i in range(p.num_hidden_layers)}
    tensors["input_ids"] = torch.arange(b * s).reshape(b, s)
    tensors["attention_mask"] = torch.from_numpy(mask)
    path = tmp_path / "pass0.safetensors"
    save_file(tensors, str(path))
    out = tmp_path / "hf.h5"
    import_dump([str(path)], out, "hf-router-logits", model=model)
    keep = mask.ravel().astype(bool)
    want_ids = np.empty((int(keep.sum()), p.num_hidden_layers, p.top_k), dtype=np.int64)
    want_w = np.empty(want_ids.shape)
    # the plain NumPy reference router, fed the logits through an identity gate
    for i in range(p.num_hidden_layers):
        ids, w = reference_routing(logits[i][keep], np.eye(p.num_experts), p.top_k,
                                   norm_topk_prob=p.norm_topk_prob)
        want_ids[:, i], want_w[:, i] = ids, w
    with open_trace(out) as trace:
        chunk = trace.read_all()
    np.testing.assert_array_equal(chunk.expert_ids, want_ids)
    assert chunk.expert_weights is not None
    np.testing.assert_allclose(chunk.expert_weights.astype(np.float64), want_w, rtol=2e-3, atol=1e-3)
    np.testing.assert_array_equal(chunk.seq_id, [0] * 5 + [1] * 3)
    np.testing.assert_array_equal(chunk.position, [0, 1, 2, 3, 4, 0, 1, 2])
    np.testing.assert_array_equal(chunk.token_id, [0, 1, 2, 3, 4, 7, 8, 9])


def test_hf_router_logits_bad_inputs(tmp_path: Path) -> None:
    import torch
    from safetensors.torch import save_file

    out = tmp_path / "hf.h5"
    path = tmp_path / "x.safetensors"
    save_file({f"router_logits.{i}": torch.zeros(3, 64) for i in range(15)}, str(path))
    with pytest.raises(InputError, match="router_logits.15"):
        import_dump([str(path)], out, "hf-router-logits", model="olmoe")
    save_file({"router_logits": torch.zeros(16, 3, 60)}, str(path))
    with pytest.raises(InputError, match="expected"):
        import_dump([str(path)], out, "hf-router-logits", model="olmoe")
    path.write_bytes(b"\xff" * 40)
    with pytest.raises(InputError, match="safetensors"):
        import_dump([str(path)], out, "hf-router-logits", model="olmoe")
    with pytest.raises(InputError, match="sigmoid"):
        import_dump([str(path)], out, "hf-router-logits", model="deepseek-v3")
    assert not out.exists()


def test_sglang_stat_and_per_pass_become_load_files(tmp_path: Path) -> None:
    import torch

    from traces.loadfile import read_load_file

    rng = np.random.default_rng(6)
    counts = rng.integers(0, 50, size=(5, 16, 64)).astype(np.int32)  # [steps, layers, logical experts]
    torch.save({"rank": 0, "logical_count": torch.from_numpy(counts),
                "average_utilization_rate_over_window": None},
               tmp_path / "expert_distribution_recorder_1.0.pt")
    out = tmp_path / "stat.json"
    result = import_dump([str(tmp_path / "expert_distribution_recorder_1.0.pt")], out, "sglang-stat",
                         model="olmoe")
    assert result.kind == "load file" and result.details["steps"] == 5
    assert result.num_tokens == int(counts.sum(axis=(0, 2)).max()) // 8  # one layer's selections / top-k
    load = read_load_file(out)
    np.testing.assert_array_equal(load.load, counts.sum(axis=0))
    assert load.layers == list(range(16)) and load.steps == 5 and load.model_id == "allenai/OLMoE-1B-7B-0924"

    p2l = np.tile(np.concatenate([np.arange(64), [3, 5]]), (16, 1))
    phys = rng.integers(0, 9, size=(2, 16, 66)).astype(np.int32)
    records = [{"forward_pass_id": i, "rank": 0, "gatherer_key": "primary",
                "global_physical_count": torch.from_numpy(phys[i])} for i in range(2)]
    torch.save({"records": records, "last_physical_to_logical_map": torch.from_numpy(p2l)},
               tmp_path / "pp0.pt")
    torch.save({"records": records, "last_physical_to_logical_map": torch.from_numpy(p2l)},
               tmp_path / "pp1.pt")
    out2 = tmp_path / "pass.json"
    import_dump([str(tmp_path / "pp0.pt"), str(tmp_path / "pp1.pt")], out2, "sglang-per-pass", model="olmoe")
    want = phys.sum(axis=0)[:, :64].astype(np.int64)
    want[:, 3] += phys.sum(axis=0)[:, 64]
    want[:, 5] += phys.sum(axis=0)[:, 65]
    np.testing.assert_array_equal(read_load_file(out2).load, want)  # the second rank's identical passes: once
    with pytest.raises(InputError, match="load file"):
        import_dump([str(tmp_path / "pp0.pt")], tmp_path / "x.h5", "sglang-per-pass", model="olmoe")


def test_writer_api_example_validates(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The writer example of docs/trace-format.md runs, and its file passes validation with provenance
    filled."""
    import re

    from traces.validate import validate

    doc = (Path(__file__).resolve().parent.parent / "docs" / "trace-format.md").read_text()
    section = doc.split("## Writing a trace from another tool", 1)[1]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)  # type: ignore[union-attr]
    monkeypatch.chdir(tmp_path)
    exec(compile(code, "trace-format.md:writer", "exec"), {})
    assert validate(tmp_path / "written-by-another-tool.h5").num_tokens == 9
    with open_trace(tmp_path / "written-by-another-tool.h5") as trace:
        assert trace.metadata.created_at and trace.metadata.tool_version


def test_shapes_from_a_config_json(tmp_path: Path) -> None:
    """--config: MoE layers, experts, top-k and router semantics from a Hugging Face config.json."""
    from traces.importers.model_shape import metadata_from_config

    config = tmp_path / "config.json"
    config.write_text(json.dumps({
        "model_type": "deepseek_v3", "_name_or_path": "org/tiny-dsv3", "num_hidden_layers": 5,
        "first_k_dense_replace": 1, "n_routed_experts": 64, "num_experts_per_tok": 8, "hidden_size": 256,
        "moe_intermediate_size": 128, "intermediate_size": 512, "n_shared_experts": 1,
        "scoring_func": "sigmoid", "norm_topk_prob": True, "routed_scaling_factor": 2.5, "n_group": 8,
        "topk_group": 4,
        "vocab_size": 1000, "num_attention_heads": 4, "torch_dtype": "bfloat16"}))
    meta = metadata_from_config(config, source="megatron")
    assert meta.moe_layers == [1, 2, 3, 4] and meta.num_experts == 64 and meta.top_k == 8
    assert meta.router_scoring == "sigmoid" and meta.norm_topk_prob and meta.routed_scaling_factor == 2.5
    assert meta.num_shared_experts == 1 and meta.dense_intermediate_size == 512
    assert meta.notes["expert_groups"] == 8 and meta.model_id == "org/tiny-dsv3"
    mixtral = tmp_path / "mixtral.json"
    mixtral.write_text(json.dumps({"model_type": "mixtral", "num_hidden_layers": 2, "num_local_experts": 8,
                                   "num_experts_per_tok": 2, "hidden_size": 64, "intermediate_size": 128}))
    meta = metadata_from_config(mixtral, source="vllm")
    assert meta.norm_topk_prob and meta.router_scoring == "softmax" and meta.moe_layers == [0, 1]
    rng = np.random.default_rng(1)
    ids = np.argsort(rng.random((3, 2, 8)), axis=-1)[..., :2]
    dump = tmp_path / "r.json"
    dump.write_text(json.dumps({"prompt_token_ids": [1, 2], "outputs": [{"routed_experts": ids.tolist()}]}))
    import_dump([str(dump)], tmp_path / "o.h5", "vllm", config=str(mixtral))
    with open_trace(tmp_path / "o.h5") as trace:
        np.testing.assert_array_equal(trace.read_all().expert_ids, ids)
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"model_type": "x", "num_hidden_layers": 2, "hidden_size": 8}))
    with pytest.raises(InputError, match="number of experts"):
        metadata_from_config(bad)
    with pytest.raises(InputError, match="exactly one"):
        import_dump([str(dump)], tmp_path / "p.h5", "vllm", config=str(mixtral), model="olmoe")


def test_write_trace_fills_provenance(tmp_path: Path) -> None:
    """write_trace, the one-call form, leaves a file that validates though the caller set no provenance."""
    from traces import TraceChunk, write_trace
    from traces.presets import preset_metadata
    from traces.validate import validate

    meta = preset_metadata("mixtral-8x7b", source="tabular", has_weights=False, has_token_ids=False)
    assert meta.created_at == "" and meta.tool_version == ""
    ids = np.tile(np.array([[0, 1]], dtype=np.uint8), (3, 32, 1))
    chunk = TraceChunk(seq_id=np.zeros(3, np.int32), position=np.arange(3, dtype=np.int32),
                       phase=np.zeros(3, np.uint8), step=np.zeros(3, np.int32), expert_ids=ids)
    write_trace(tmp_path / "w.arrow", meta, chunk)
    assert validate(tmp_path / "w.arrow").num_tokens == 3
    with open_trace(tmp_path / "w.arrow") as trace:
        assert trace.metadata.created_at.endswith("+00:00") and trace.metadata.tool_version
