"""torch_zip, the streamed restricted reader of torch.save files: the same objects as torch.load, records
streamed one at a time, everything outside its rules left to torch.load(weights_only=True); and the id
kernels against their NumPy references."""

from __future__ import annotations

import pickle
import struct
from pathlib import Path

import numpy as np
import pytest
from import_fixtures import sglang_per_token

from traces import open_trace
from traces.errors import InputError
from traces.importers import import_dump
from traces.importers.id_kernels import (
    OK,
    OUT_OF_RANGE,
    PAST_MAP,
    TWICE,
    WRONG_COUNT,
    first_bad_id,
    first_bad_id_numpy,
    physical_to_logical,
    physical_to_logical_numpy,
)
from traces.importers.safe_load import load_torch
from traces.importers.torch_zip import TorchZip, Unsupported, decode_int_run, decode_int_run_numpy

torch = pytest.importorskip("torch")


def _same(ours, theirs, where="top"):
    if isinstance(theirs, torch.Tensor):
        want = theirs.numpy()
        assert isinstance(ours, np.ndarray) and ours.dtype == want.dtype and np.array_equal(ours, want), where
    elif isinstance(theirs, list):
        if isinstance(ours, np.ndarray):  # a list of ints comes back as one int32 array
            assert ours.dtype == np.int32 and ours.tolist() == theirs, where
        else:
            assert isinstance(ours, list) and len(ours) == len(theirs), where
            for i, (a, b) in enumerate(zip(ours, theirs, strict=True)):
                _same(a, b, f"{where}[{i}]")
    elif isinstance(theirs, (dict, tuple)):
        assert type(ours) is type(theirs) or isinstance(theirs, dict), where
        if isinstance(theirs, dict):
            assert list(ours) == list(theirs), where
            for k in theirs:
                _same(ours[k], theirs[k], f"{where}.{k}")
        else:
            for i, (a, b) in enumerate(zip(ours, theirs, strict=True)):
                _same(a, b, f"{where}[{i}]")
    else:
        assert type(ours) is type(theirs) and ours == theirs, (where, ours, theirs)


def test_reads_what_torch_load_reads(tmp_path: Path) -> None:
    base = torch.arange(60, dtype=torch.int64).reshape(3, 4, 5)
    obj = {
        "ints": [0, 255, 256, 65535, 65536, -1, -2**31, 2**31 - 1, 2**31, -2**40, 2**70],
        "long_list": list(range(2500)),  # several APPENDS batches of 1000
        "mixed": [1, "a", None, True, False, 2.5, (1, 2), [], {}],
        "nested": {"a": {"b": [[1, 2], [3]]}, "t": (1, (2, 3), "x")},
        "tensors": [torch.tensor([[1, 2], [3, 4]], dtype=torch.int32), base, base[1], base[:, 1:3, ::2],
                    base.transpose(0, 2), torch.zeros((0, 4), dtype=torch.int16),
                    torch.tensor([1.5, -2.0], dtype=torch.float32), torch.tensor([True, False]),
                    torch.tensor(7, dtype=torch.uint8)],
        "text": "récords ✓",
    }
    path = tmp_path / "obj.pt"
    torch.save(obj, path)
    with TorchZip(path) as archive:
        ours = archive.load()
    _same(ours, torch.load(path, weights_only=True))


def test_records_stream_one_at_a_time(tmp_path: Path) -> None:
    records = [{"id": i, "tokens": list(range(i, i + 1500)), "ids": torch.full((2, 3), i, dtype=torch.int32)}
               for i in range(5)]
    path = tmp_path / "records.pt"
    torch.save({"records": records, "map": torch.arange(4)}, path)
    with TorchZip(path) as archive:
        seen = list(archive.records(read_tensors=False))
        top = archive.top
    assert [r["id"] for r in seen] == list(range(5))
    assert all(r["tokens"].tolist() == list(range(r["id"], r["id"] + 1500)) for r in seen)
    assert all(r["ids"].shape == (2, 3) for r in seen)  # not read: where the bytes are
    assert top["records"] == [] and top["map"].tolist() == [0, 1, 2, 3]


def test_a_record_sharing_a_container_is_left_to_torch_load(tmp_path: Path) -> None:
    shared = [1, 2, 3]
    path = tmp_path / "shared.pt"
    torch.save({"records": [{"a": shared}, {"b": shared}], "map": torch.arange(2)}, path)
    with TorchZip(path) as archive, pytest.raises(Unsupported, match="shares a container"):
        list(archive.records())
    assert load_torch(path)["records"][1]["b"] == [1, 2, 3]  # the fallback reads it as torch does


class _Boom:
    def __reduce__(self):
        return (print, ("this must never run",))


def test_outside_the_rules_is_unsupported_and_never_runs(tmp_path: Path, capsys) -> None:
    hostile = tmp_path / "hostile.pt"
    torch.save({"records": [], "x": _Boom()}, hostile)
    with TorchZip(hostile) as archive, pytest.raises(Unsupported, match="global __builtin__.print"):
        archive.load()
    with pytest.raises(InputError, match="refused"):
        load_torch(hostile)
    assert "must never run" not in capsys.readouterr().out
    legacy = tmp_path / "legacy.pt"
    torch.save({"a": torch.arange(3)}, legacy, _use_new_zipfile_serialization=False)
    with pytest.raises(Unsupported):
        TorchZip(legacy)
    assert load_torch(legacy)["a"].tolist() == [0, 1, 2]  # torch.load still reads the old format
    # a tensor whose declared extent runs past its storage
    plain = tmp_path / "plain.pt"
    torch.save({"t": torch.arange(4, dtype=torch.int32)}, plain)
    raw = bytearray(plain.read_bytes())
    at = raw.find(pickle.BININT1 + bytes([4]) + pickle.TUPLE1)  # the size tuple (4,)
    assert at > 0
    raw[at + 1] = 9
    plain.write_bytes(bytes(raw))
    with TorchZip(plain) as archive, pytest.raises(Unsupported, match="outside its storage"):
        archive.load()


def test_sglang_import_streams_and_keeps_routing_apart(tmp_path: Path) -> None:
    paths, exp = sglang_per_token(tmp_path, ranks=1)
    out = tmp_path / "t.h5"
    result = import_dump([str(paths[0])], out, "sglang-per-token", model="olmoe-1b-7b")
    assert result.num_tokens == exp.expert_ids.shape[0]
    # a second rank with the same passes but other experts is not a tensor-parallel copy: both are kept
    data = torch.load(paths[0], weights_only=True)
    for record in data["records"]:
        topk = record["topk_ids_of_layer"]
        topk[:, :, :2] = topk[:, :, [1, 0]]  # swap two choices: same experts per token, other order
        record["topk_ids_of_layer"] = topk
    other = tmp_path / "other.pt"
    torch.save(data, other)
    both = import_dump([str(paths[0]), str(other)], tmp_path / "both.h5", "sglang-per-token",
                       model="olmoe-1b-7b")
    assert both.num_tokens == 2 * result.num_tokens and both.details["duplicate_rank_files"] == 0
    # a legacy (non-zip) dump goes through torch.load(weights_only=True) and imports the same rows
    legacy = tmp_path / "legacy.pt"
    torch.save(torch.load(paths[0], weights_only=True), legacy, _use_new_zipfile_serialization=False)
    again = import_dump([str(legacy)], tmp_path / "legacy.h5", "sglang-per-token", model="olmoe-1b-7b")
    with open_trace(out) as a, open_trace(tmp_path / "legacy.h5") as b:
        x, y = a.read_all(), b.read_all()
    assert again.num_tokens == result.num_tokens
    assert all(np.array_equal(getattr(x, c), getattr(y, c))
               for c in ("seq_id", "position", "phase", "step", "token_id", "expert_ids"))


def test_decode_int_run_matches_its_reference() -> None:
    rng = np.random.default_rng(0)
    parts = []
    for _ in range(300):
        op = rng.integers(3)
        if op == 0:
            parts.append(pickle.BININT1 + bytes([int(rng.integers(256))]))
        elif op == 1:
            parts.append(pickle.BININT2 + struct.pack("<H", int(rng.integers(65536))))
        else:
            parts.append(pickle.BININT + struct.pack("<i", int(rng.integers(-2**31, 2**31))))
    data = b"".join(parts)
    for tail in (b"e", b"", data[:1]):  # an APPENDS, the end of the buffer, a truncated opcode
        buf = np.frombuffer(data + tail, dtype=np.uint8)
        for limit in (1, 7, 300, 512):
            out = np.zeros(limit, dtype=np.int32)
            count, pos = decode_int_run(buf, 0, out)
            ref, ref_pos = decode_int_run_numpy(buf, 0, limit)
            assert (pos, out[:count].tolist()) == (ref_pos, ref.tolist())


def test_id_kernels_match_their_references() -> None:
    rng = np.random.default_rng(1)
    for experts in (64, 300):
        ids = np.argsort(rng.random((50, 3, experts)), axis=-1)[..., :4].astype(np.int64)
        assert first_bad_id(ids, experts) == first_bad_id_numpy(ids, experts) == (OK, 0, 0, 0)
        for plant, kind in (((7, 2, 1), -1), ((7, 2, 1), experts), ((5, 1, 3), None)):
            bad = ids.copy()
            if kind is None:
                bad[plant] = bad[plant[0], plant[1], 0]  # an expert twice
            else:
                bad[plant] = kind
            bad[30, 0, 0] = experts + 5  # a later problem must not be the one reported
            got = first_bad_id(bad, experts)
            assert got == first_bad_id_numpy(bad, experts)
            assert got[:3] == ((TWICE if kind is None else OUT_OF_RANGE), plant[0], plant[1])
    # physical -> logical: 4 recorder layers (rows 1 and 3 are MoE), 6 physical slots over 4 experts
    p2l = np.array([[0, 1, 2, 3, 0, 1]] * 4)
    rows = np.array([1, 3])
    topk = np.full((4, 20, 3), -1, dtype=np.int32)
    topk[:, :, :2] = np.argsort(rng.random((4, 20, 6)), axis=-1)[..., :2]
    out, ref = (np.zeros((20, 2, 2), dtype=np.uint8) for _ in range(2))
    assert physical_to_logical(topk, rows, p2l, 2, out) == physical_to_logical_numpy(topk, rows, p2l, 2, ref)
    assert np.array_equal(out, ref) and np.array_equal(out, p2l[rows[None, :, None], topk[rows, :, :2]
                                                             .transpose(1, 0, 2)])
    for t, layer, value, q, kind in ((9, 1, -1, 0, WRONG_COUNT), (4, 0, 6, 1, PAST_MAP),
                                     (12, 1, 2, 2, WRONG_COUNT)):
        wrong = topk.copy()
        wrong[rows[layer], t, q] = value
        wrong[rows[0], 15, 0] = 99  # later, on another layer
        found = physical_to_logical(wrong, rows, p2l, 2, out)
        assert found == physical_to_logical_numpy(wrong, rows, p2l, 2, ref) == (kind, t, layer)


def test_copies_are_bounded_where_torch_would_share(tmp_path: Path) -> None:
    """One list (or tensor) referenced many times is one object to torch.load; copying it each time could
    take far more memory than the file, so this reader leaves such files to torch.load."""
    inner: list = [0] * 4
    for _ in range(20):  # 2**20 paths to the same four ints
        inner = [inner, inner]
    path = tmp_path / "shared.pt"
    torch.save({"deep": inner}, path)
    with TorchZip(path) as archive, pytest.raises(Unsupported, match="nested or shared"):
        archive.load()
    big = torch.zeros(1 << 16, dtype=torch.int64)
    torch.save({"same": [big] * 2000}, path)  # 2000 references to one 512 KiB tensor
    with TorchZip(path) as archive, pytest.raises(Unsupported, match="repeat more bytes"):
        archive.load()
    assert len(load_torch(path)["same"]) == 2000
