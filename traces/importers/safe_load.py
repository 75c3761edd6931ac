"""Opening files from other people's clusters: `.pt` only through torch's weights-only unpickler, JSON lines
with a bound on line length, and integer arrays checked before they are used as indices.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from traces.errors import InputError, read_json

MAX_LINE_BYTES = 1 << 30  # one JSON line longer than this is refused rather than read into memory


def load_torch(path: Path) -> Any:
    """torch.load(weights_only=True): tensors, dicts, lists and numbers only, never arbitrary pickled objects.

    A file whose pickle names anything else (a class, a function to call) is refused with one line; the code
    it would run never runs. Tensors are memory-mapped where the file allows it, so a large dump is not read
    at once.
    """
    import pickle
    import warnings

    import torch

    if not path.exists():
        raise InputError(f"{path}: no such file")
    try:
        with warnings.catch_warnings():
            # torch's notes on pickle protocols would break the one-line error
            warnings.simplefilter("ignore")
            try:
                return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
            except RuntimeError as exc:
                if "mmap" not in str(exc):  # legacy (non-zip) files cannot be mapped; read those plainly
                    raise
                return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        lines = [x.strip() for x in str(exc).splitlines() if "Unsupported" in x or "GLOBAL" in x]
        why = lines[0] if lines else "it names a Python object to construct"
        raise InputError(f"{path}: refused: the file holds more than tensors and plain data, which moe-trace "
                         f"never unpickles ({why[:160]})") from exc
    except Exception as exc:  # a damaged zip or pickle can fail anywhere inside torch.load
        raise InputError(f"{path}: not a readable torch file ({type(exc).__name__}: "
                         f"{str(exc)[:160]})") from exc


def as_int_array(value: Any, where: str, ndim: int) -> np.ndarray:
    """An integer tensor, array or nested list as a signed-compatible integer array with `ndim` dimensions
    (the source's dtype is kept, so an int32 dump is not copied to int64)."""
    try:
        import torch

        if isinstance(value, torch.Tensor):
            if value.dtype.is_floating_point or value.dtype.is_complex or value.dtype == torch.bool:
                raise InputError(f"{where}: expected integers, found a {value.dtype} tensor")
            arr = value.numpy()
        else:
            arr = np.asarray(value)
    except (TypeError, ValueError, RuntimeError) as exc:
        raise InputError(f"{where}: not a rectangular array of integers ({exc})") from exc
    if arr.dtype.kind not in "iu":
        if arr.size == 0 and arr.dtype.kind == "f":
            arr = arr.astype(np.int64)
        else:
            raise InputError(f"{where}: expected integers, found {arr.dtype}")
    if arr.ndim != ndim:
        raise InputError(f"{where}: expected {ndim} dimensions, found shape {tuple(arr.shape)}")
    if arr.dtype.kind == "u" and arr.dtype.itemsize >= 8:
        if arr.size and arr.max() > np.iinfo(np.int64).max:
            raise InputError(f"{where}: integer {int(arr.max())} is out of range")
        return arr.astype(np.int64)
    return arr  # int8..int64 or a small unsigned type: every value fits int64 arithmetic


def json_lines(path: Path) -> Iterator[tuple[int, Any]]:
    """(line number, parsed object) for each non-blank line of a JSON-lines file, streamed."""
    if not path.exists():
        raise InputError(f"{path}: no such file")
    with open(path, "rb") as fh:
        for number, line in enumerate(iter(lambda: fh.readline(MAX_LINE_BYTES + 1), b""), start=1):
            if len(line) > MAX_LINE_BYTES:
                raise InputError(f"{path}: line {number} is longer than {MAX_LINE_BYTES >> 20} MiB")
            if not line.strip():
                continue
            try:
                yield number, json.loads(line.decode("utf-8"))  # str: json skips guessing the encoding
            except (ValueError, UnicodeDecodeError) as exc:
                raise InputError(f"{path}: line {number} is not valid JSON ({str(exc)[:120]})") from exc


def json_records(path: Path) -> Iterator[tuple[str, Any]]:
    """Records of a .json file (one object or a list of them) or a .jsonl file (one per line): (where,
    record)."""
    if path.suffix.lower() in (".jsonl", ".ndjson"):
        for number, obj in json_lines(path):
            yield f"{path}: line {number}", obj
        return
    data = read_json(path, "valid JSON")
    items = data if isinstance(data, list) else [data]
    for i, obj in enumerate(items):
        yield f"{path}: record {i}", obj


def require(record: Any, keys: tuple[str, ...], where: str) -> None:
    """A record must be a JSON object (or dict) holding every key."""
    if not isinstance(record, dict):
        raise InputError(f"{where}: expected an object, found {type(record).__name__}")
    missing = [k for k in keys if k not in record]
    if missing:
        raise InputError(f"{where}: missing field {missing[0]!r}")
