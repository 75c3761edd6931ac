"""A generic tabular form: JSON lines, CSV or Parquet, with the columns named by options.

Two row shapes:
- one row per (request, layer, token) -- what public routing dumps use -- holding the token's expert list for
  that layer and, optionally, its gating probabilities (columns --seq-col, --layer-col, --position-col,
  --experts-col, --weights-col);
- one row per token (--layer-col ""), whose expert list is [layers][top-k].
Rows of one sequence must come together (in any order inside it), which keeps memory to one sequence. Optional
columns: --token-col, --phase-col ("prefill"/"decode" or 0/1; without it every token is prefill) and
--step-col (without it each sequence's prefill is one step and each decode token one more, sequences one after
another). CSV cells holding lists are JSON ("[3, 17]") or separated by spaces or semicolons.
Shape legend: T tokens of a sequence, L MoE layers, K top-k.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from traces.errors import InputError
from traces.importers.safe_load import json_lines
from traces.importers.sink import TraceSink
from traces.schema import PHASE_DECODE, PHASE_PREFILL

PHASE_VALUES = {"prefill": PHASE_PREFILL, "p": PHASE_PREFILL, "0": PHASE_PREFILL, "extend": PHASE_PREFILL,
                "decode": PHASE_DECODE, "d": PHASE_DECODE, "1": PHASE_DECODE}


@dataclass(frozen=True)
class Columns:
    """Which column holds what; an empty name means the column is absent."""

    seq: str = "request_id"
    layer: str = "layer"  # "" for one row per token with [layers][top-k] expert lists
    position: str = "token_idx"
    experts: str = "topk_ids"
    weights: str = ""  # gating probabilities of the chosen experts, same shape as the expert list
    token: str = ""
    phase: str = ""
    step: str = ""


def rows(path: Path, needed: list[str]) -> Iterator[tuple[str, dict[str, Any]]]:
    """(where, row) for each row of a .jsonl/.ndjson, .csv or .parquet file, streamed."""
    suffix = path.suffix.lower()
    if not path.exists():
        raise InputError(f"{path}: no such file")
    if suffix in (".jsonl", ".ndjson", ".json"):
        for number, obj in json_lines(path):
            if not isinstance(obj, dict):
                raise InputError(f"{path}: line {number}: expected an object per line")
            yield f"{path}: line {number}", obj
    elif suffix == ".csv":
        with open(path, newline="") as fh:
            for number, row in enumerate(csv.DictReader(fh), start=2):
                yield f"{path}: line {number}", row
    elif suffix in (".parquet", ".pq"):
        import pyarrow as pa
        import pyarrow.parquet as pq

        try:
            pf = pq.ParquetFile(path)
            missing = [c for c in needed if c not in pf.schema_arrow.names]
            if missing:
                raise InputError(f"{path}: no column {missing[0]!r} (has {', '.join(pf.schema_arrow.names)})")
            start = 0
            for batch in pf.iter_batches(batch_size=1 << 14, columns=needed):
                for i, row in enumerate(batch.to_pylist()):
                    yield f"{path}: row {start + i}", row
                start += batch.num_rows
        except (pa.ArrowException, OSError) as exc:
            raise InputError(f"{path}: not a readable Parquet file ({str(exc)[:160]})") from exc
    else:
        raise InputError(f"{path}: unknown table extension {suffix!r}; use .jsonl, .csv or .parquet")


def _cell_list(value: Any, where: str, name: str) -> Any:
    if isinstance(value, str):
        text = value.strip()
        try:
            return json.loads(text) if text.startswith("[") else [float(x) if "." in x else int(x)
                                                                  for x in text.replace(";", " ").split()]
        except ValueError:
            raise InputError(f"{where}: column {name!r} is not a list ({text[:40]!r})") from None
    return value


def _int(value: Any, where: str, name: str) -> int:
    try:
        if isinstance(value, float) and not value.is_integer():
            raise ValueError
        return int(value)
    except (TypeError, ValueError):
        raise InputError(f"{where}: column {name!r} holds {value!r}, not an integer") from None


class _Sequence:
    """Rows of one sequence, keyed by position: per layer row the expert list (and weights)."""

    def __init__(self, key: Any, where: str):
        self.key = key
        self.where = where
        self.tokens: dict[int, dict[str, Any]] = {}


def import_table(paths: list[Path], sink: TraceSink, cols: Columns) -> dict[str, Any]:
    meta = sink.metadata
    needed = [c for c in (cols.seq, cols.layer, cols.position, cols.experts, cols.weights, cols.token,
                          cols.phase, cols.step) if c]
    layer_row = {layer: i for i, layer in enumerate(meta.moe_layers)}
    seen: set[Any] = set()
    state = {"seq": 0, "step": 0}
    current: _Sequence | None = None
    for path in paths:
        for where, row in rows(path, needed):
            missing = [c for c in needed if c not in row or row[c] is None or row[c] == ""]
            if missing:
                raise InputError(f"{where}: missing column {missing[0]!r}")
            key = row[cols.seq]
            if current is None or key != current.key:
                if current is not None:
                    _emit(current, sink, cols, layer_row, state)
                if key in seen:
                    raise InputError(f"{where}: rows of sequence {key!r} are not together (sort the table by "
                                     f"{cols.seq!r})")
                seen.add(key)
                current = _Sequence(key, where)
            pos = _int(row[cols.position], where, cols.position)
            token = current.tokens.setdefault(pos, {"layers": {}, "where": where})
            experts = _cell_list(row[cols.experts], where, cols.experts)
            weights = _cell_list(row[cols.weights], where, cols.weights) if cols.weights else None
            if cols.layer:
                layer = _int(row[cols.layer], where, cols.layer)
                if layer not in layer_row:
                    raise InputError(f"{where}: layer {layer} is not a MoE layer of the model")
                if layer in token["layers"]:
                    raise InputError(f"{where}: sequence {key!r} position {pos} has layer {layer} twice")
                token["layers"][layer] = (experts, weights)
            else:
                if pos in current.tokens and token["layers"]:
                    raise InputError(f"{where}: sequence {key!r} has position {pos} twice")
                token["layers"] = {"all": (experts, weights)}
            for name, col in (("token", cols.token), ("phase", cols.phase), ("step", cols.step)):
                if col:
                    token[name] = row[col]
    if current is not None:
        _emit(current, sink, cols, layer_row, state)
    return {"sequences": state["seq"]}


def _emit(seq: _Sequence, sink: TraceSink, cols: Columns, layer_row: dict[int, int],
          state: dict[str, int]) -> None:
    meta = sink.metadata
    positions = sorted(seq.tokens)
    n = len(positions)
    shape = (meta.num_moe_layers, meta.top_k)
    ids = np.empty((n, *shape), dtype=np.int64)
    weights = np.empty((n, *shape), dtype=np.float64) if cols.weights else None
    for t, pos in enumerate(positions):
        token = seq.tokens[pos]
        where = token["where"]
        layers = token["layers"]
        if cols.layer:
            absent = [layer for layer in layer_row if layer not in layers]
            if absent:
                raise InputError(f"{where}: sequence {seq.key!r} position {pos} has no row for MoE layer "
                                 f"{absent[0]}")
            e_rows = [layers[layer][0] for layer in layer_row]
            w_rows = [layers[layer][1] for layer in layer_row]
        else:
            e_rows, w_rows = layers["all"]
        ids[t] = _table(e_rows, shape, where, cols.experts, np.int64)
        if weights is not None:
            weights[t] = _table(w_rows, shape, where, cols.weights, np.float64)
    first = seq.tokens[positions[0]]
    phase = np.full(n, PHASE_PREFILL, dtype=np.uint8)
    if cols.phase:
        for t, pos in enumerate(positions):
            value = str(seq.tokens[pos]["phase"]).strip().lower()
            if value not in PHASE_VALUES:
                raise InputError(f"{seq.tokens[pos]['where']}: phase {value!r} is neither prefill nor decode")
            phase[t] = PHASE_VALUES[value]
    if cols.step:
        step = np.array([_int(seq.tokens[p]["step"], seq.tokens[p]["where"], cols.step) for p in positions])
    else:
        step = state["step"] + np.cumsum(phase == PHASE_DECODE)
        state["step"] = int(step[-1]) + 1
    token_ids = None
    if cols.token:
        token_ids = np.array([_int(seq.tokens[p]["token"], seq.tokens[p]["where"],
                                   cols.token) for p in positions])
    sink.add(seq_id=np.full(n, state["seq"]), position=np.asarray(positions), phase=phase, step=step,
             expert_ids=ids, expert_weights=weights, token_id=token_ids, where=first["where"])
    state["seq"] += 1


def _table(value: Any, shape: tuple[int, int], where: str, name: str, dtype: type) -> np.ndarray:
    try:
        arr: np.ndarray = np.asarray(value, dtype=dtype)
    except (TypeError, ValueError):
        raise InputError(f"{where}: column {name!r} is not a rectangular list of numbers") from None
    if arr.shape != shape:
        raise InputError(f"{where}: column {name!r} has shape {arr.shape} per token, expected {shape} "
                         "(MoE layers, top-k)")
    return arr
