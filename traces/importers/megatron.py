"""Megatron-Core's router tracer: `router_trace_rank{N}.jsonl`, one JSON line per (step, block, layer) of a
rank:

    {"step", "stage", "block": "decoder" | "mtp", "layer", "rank", "num_tokens", "topk", "top_indices":
    [[ids]...]}

(docs/import.md cites the tracer's code). Row t of every layer's record in one step is the same token. The
records hold no request ids, positions or phases: each (rank, step) becomes one sequence whose positions are
its rows, and every token gets the phase given by --phase. Multi-token-prediction records (block "mtp") are
skipped. Tensor-parallel ranks trace the same tokens: a rank file equal to an earlier one but for "rank" is
read once. Shape legend: T tokens of a step, L MoE layers, K top-k.
"""

from __future__ import annotations

import heapq
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from traces.errors import InputError
from traces.importers.safe_load import as_int_array, json_lines, require
from traces.importers.sink import TraceSink, fingerprint

RECORD_KEYS = ("step", "layer", "num_tokens", "topk", "top_indices")


def import_router_trace(paths: list[Path], sink: TraceSink, phase: int) -> dict[str, Any]:
    """Import rank files; the same step on several ranks is one forward pass (data-parallel ranks' tokens side
    by side), so the files are merged by step, each streamed one step at a time. A rank file whose records
    equal an earlier one's is imported once."""
    meta = sink.metadata
    layer_row = {layer: i for i, layer in enumerate(meta.moe_layers)}
    skipped = [0]
    unique, seen = [], set()
    for path in paths:  # a first streamed pass: tensor-parallel ranks write identical records but for "rank"
        key = _file_fingerprint(path)
        if key not in seen:
            seen.add(key)
            unique.append(path)
    streams = [_steps(path, meta.top_k, layer_row, skipped) for path in unique]
    next_seq = 0
    for step, where, pending in heapq.merge(*streams, key=lambda item: item[0]):
        next_seq = _emit(pending, step, where, sink, layer_row, next_seq, phase)
    return {"skipped_mtp_records": skipped[0], "duplicate_rank_files": len(paths) - len(unique)}


def _file_fingerprint(path: Path) -> bytes:
    """Digest of a rank file's routing records with the rank number left out."""
    parts: list[Any] = []
    for _, record in json_lines(path):
        if isinstance(record, dict):
            record = {k: v for k, v in record.items() if k != "rank"}
        parts.append(json.dumps(record, sort_keys=True))
    return fingerprint(parts)


def _steps(path: Path, top_k: int, layer_row: dict[int, int],
           skipped: list[int]) -> Iterator[tuple[int, str, dict[int, np.ndarray]]]:
    """(step, where it starts, {layer: ids [T, K]}) for each step of one rank file, in file order."""
    pending: dict[int, np.ndarray] = {}
    current: int | None = None
    where0 = ""
    for number, record in json_lines(path):
        where = f"{path}: line {number}"
        require(record, RECORD_KEYS, where)
        if record.get("block", "decoder") != "decoder":
            skipped[0] += 1
            continue
        step = record["step"]
        if not isinstance(step, int) or step < 0:
            raise InputError(f"{where}: step {step!r} is not a non-negative integer")
        if current is not None and step != current:
            if step < current:
                raise InputError(f"{where}: step {step} comes after step {current} (records out of order)")
            yield current, where0, pending
            pending = {}
        if not pending:
            where0 = where
        current = step
        layer = record["layer"]
        if layer not in layer_row:
            raise InputError(f"{where}: layer {layer!r} is not a MoE layer of the model ({min(layer_row)}.."
                             f"{max(layer_row)}; pipeline stages report local layer numbers, which this "
                             "importer cannot place)")
        if layer in pending:
            raise InputError(f"{where}: layer {layer} appears twice in step {step}")
        if record["topk"] != top_k:
            raise InputError(f"{where}: topk {record['topk']!r} differs from the model's top-k {top_k}")
        n = record["num_tokens"]
        if not isinstance(n, int) or n < 0:
            raise InputError(f"{where}: num_tokens {n!r} is not a non-negative integer")
        ids = as_int_array(record["top_indices"], f"{where}: top_indices",
                           2) if n else np.zeros((0, top_k), np.int64)
        if ids.shape != (n, top_k):
            raise InputError(f"{where}: top_indices has shape {ids.shape}, expected ({n}, {top_k}) from "
                             "num_tokens and topk")
        pending[layer] = ids
    if current is not None:
        yield current, where0, pending


def _emit(pending: dict[int, np.ndarray], step: int, where: str, sink: TraceSink, layer_row: dict[int, int],
          next_seq: int, phase: int) -> int:
    """Turn one rank's step into tokens; returns the next free sequence id."""
    missing = [layer for layer in layer_row if layer not in pending]
    if missing:
        raise InputError(f"{where}: step has no record for MoE layer {missing[0]} "
                         "(every MoE layer must be traced on the rank)")
    counts = {ids.shape[0] for ids in pending.values()}
    if len(counts) != 1:
        raise InputError(f"{where}: the step's layers disagree on num_tokens ({sorted(counts)})")
    n = counts.pop()
    if n == 0:
        return next_seq
    ids = np.stack([pending[layer] for layer in layer_row], axis=1)  # [T, L, K]
    sink.add(seq_id=np.full(n, next_seq), position=np.arange(n), phase=np.full(n, phase, dtype=np.uint8),
             step=np.full(n, step), expert_ids=ids, where=where)
    return next_seq + 1
