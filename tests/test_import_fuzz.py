"""Mutated dumps of every import format: each case imports cleanly or fails with one InputError line, never a
crash, and leaves no partial output. 200 mutants per format (bit flips, truncations, zeroed and duplicated
ranges, a huge declared size)."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
from import_fixtures import megatron_trace, sglang_per_token, tabular_rows, vllm_responses

from traces.errors import InputError
from traces.fuzz import mutate  # shared with the trace encodings' fuzzing
from traces.importers import ImportOptions, import_dump
from traces.importers.tabular import Columns

CASES_PER_FORMAT = 200


def sources(tmp: Path) -> list[tuple[str, Path, ImportOptions]]:
    import torch
    from safetensors.torch import save_file

    (tmp / "s").mkdir()
    (tmp / "m").mkdir()
    sglang, _ = sglang_per_token(tmp / "s", ranks=1)
    megatron, _ = megatron_trace(tmp / "m", ranks=1, steps=2)
    vllm, _ = vllm_responses(tmp / "v.jsonl")
    rows, _ = tabular_rows(sequences=2, tokens=2)
    table = tmp / "t.jsonl"
    table.write_text("".join(json.dumps(r) + "\n" for r in rows))
    hf = tmp / "h.safetensors"
    save_file({f"router_logits.{i}": torch.randn(4, 64) for i in range(16)}
              | {"input_ids": torch.arange(4)[None]}, str(hf))
    return [("sglang-per-token", sglang[0], ImportOptions()), ("megatron", megatron[0], ImportOptions()),
            ("vllm", vllm[0], ImportOptions()), ("tabular", table,
                                                 ImportOptions(columns=Columns(weights="topk_weights"))),
            ("hf-router-logits", hf, ImportOptions())]


@pytest.mark.timeout(600)
def test_mutated_dumps_never_crash(tmp_path: Path) -> None:
    rng = random.Random(20261202)
    out = tmp_path / "out.h5"
    for fmt, path, options in sources(tmp_path):
        raw = path.read_bytes()
        for case in range(CASES_PER_FORMAT):
            mutant = tmp_path / f"mutant{path.suffix}"
            mutant.write_bytes(mutate(raw, rng))
            try:
                import_dump([str(mutant)], out, fmt, model="olmoe", options=options, force=True)
            except InputError as exc:
                assert "\n" not in str(exc), (fmt, case, str(exc))
                assert not out.exists(), (fmt, case)
            assert not (tmp_path / "out.h5.partial").exists(), (fmt, case)
            out.unlink(missing_ok=True)


def test_huge_declared_npy_size_is_refused(tmp_path: Path) -> None:
    """A .npy header declaring 2e12 rows is refused before numpy allocates for it."""
    import base64
    import io

    import numpy as np

    buf = io.BytesIO()
    np.lib.format.write_array_header_1_0(buf, {"descr": "<i2", "fortran_order": False,
                                               "shape": (2_000_000_000_000, 16, 8)})
    buf.write(bytes(64))
    path = tmp_path / "r.json"
    path.write_text(json.dumps({"choices": [{"routed_experts": base64.b64encode(buf.getvalue()).decode()}],
                                "usage": {"prompt_tokens": 1}}))
    with pytest.raises(InputError, match="more than its payload holds"):
        import_dump([str(path)], tmp_path / "o.h5", "vllm", model="olmoe")
