"""SGLang's expert distribution recorder dumps (docs/import.md cites the code this layout is read from).

`per_token` (`--expert-distribution-recorder-mode per_token`): one `.pt` per rank holding
    {"records": [one dict per forward pass], "last_physical_to_logical_map": int [layers, physical experts]}
where each record has forward_pass_id, rank, input_ids [T], positions [T], extend_seq_lens (None in decode),
forward_mode (1 extend, 2 decode, 3 mixed, 4 idle) and topk_ids_of_layer int32 [layers, T, 8] holding
*physical* expert ids, padded with -1 past the model's top-k.
`stat`: {"rank", "logical_count": [steps, layers, logical experts], ...}; `per_pass`: records with
global_physical_count [layers, physical experts]. Both are counts only and become a load file.
Shape legend: T tokens, L MoE layers, K top-k, P physical experts, R recorder layers (all decoder layers or
L).
"""

from __future__ import annotations

import hashlib
import heapq
from collections import defaultdict, deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from traces.errors import InputError
from traces.importers.id_kernels import PAST_MAP, WRONG_COUNT, physical_to_logical
from traces.importers.safe_load import as_int_array, load_torch, require
from traces.importers.sink import TraceSink, fingerprint
from traces.importers.torch_zip import TensorRef, TorchZip, Unsupported
from traces.schema import PHASE_DECODE, PHASE_PREFILL, TraceMetadata

MODE_EXTEND, MODE_DECODE, MODE_MIXED, MODE_IDLE = 1, 2, 3, 4  # sglang ForwardMode values
RECORD_KEYS = ("forward_pass_id", "input_ids", "positions", "forward_mode", "topk_ids_of_layer")


class SequenceTracker:
    """Gives tokens sequence ids from position continuity: SGLang's per-token records carry no request ids.

    A segment starting at position 0 is a new sequence; a segment starting at p continues the oldest sequence
    that stopped at p - 1 (a later chunk of a chunked prefill, or the next decode token).
    """

    def __init__(self, next_id: list[int]):
        self._next_id = next_id  # shared between ranks so ids never collide
        self._waiting: dict[int, deque[int]] = defaultdict(deque)  # next position -> sequences expecting it

    def assign(self, start: int, length: int) -> int:
        queue = self._waiting.get(start)
        if start > 0 and queue:
            sid = queue.popleft()
        else:
            sid = self._next_id[0]
            self._next_id[0] += 1
        self._waiting[start + length].append(sid)
        return sid


def layer_rows(meta: TraceMetadata, recorder_layers: int, where: str) -> np.ndarray:
    """Rows of SGLang's layer axis that hold the trace's MoE layers (SGLang counts every decoder layer for
    DeepSeek-style models, dense ones included, or only the MoE layers)."""
    if recorder_layers == meta.num_hidden_layers:
        return np.asarray(meta.moe_layers)
    if recorder_layers == meta.num_moe_layers:
        return np.arange(meta.num_moe_layers)
    raise InputError(f"{where}: {recorder_layers} layers, but the model has {meta.num_hidden_layers} layers "
                     f"({meta.num_moe_layers} MoE); is --model/--config the model that was served?")


def read_map(data: Any, meta: TraceMetadata, where: str) -> np.ndarray:
    """last_physical_to_logical_map [R, P], checked: every entry a logical expert of the model."""
    p2l = as_int_array(data, f"{where}: last_physical_to_logical_map", 2)
    if p2l.shape[1] < meta.num_experts:
        raise InputError(f"{where}: last_physical_to_logical_map has {p2l.shape[1]} physical experts, fewer "
                         f"than the model's {meta.num_experts}")
    if p2l.size and (p2l.min() < 0 or p2l.max() >= meta.num_experts):
        raise InputError(f"{where}: last_physical_to_logical_map holds logical id {int(p2l.max())} outside "
                         f"0..{meta.num_experts - 1}")
    return p2l


def _phases(mode: int, positions: np.ndarray, seg_lens: list[int], where: str) -> np.ndarray:
    if mode == MODE_EXTEND:
        return np.full(positions.shape[0], PHASE_PREFILL, dtype=np.uint8)
    if mode == MODE_DECODE:
        return np.full(positions.shape[0], PHASE_DECODE, dtype=np.uint8)
    if mode == MODE_MIXED:  # decode requests ride along as one-token segments past position 0
        phase = np.full(positions.shape[0], PHASE_PREFILL, dtype=np.uint8)
        start = 0
        for n in seg_lens:
            if n == 1 and positions[start] > 0:
                phase[start] = PHASE_DECODE
            start += n
        return phase
    raise InputError(f"{where}: forward_mode {mode} (speculative or draft passes) is not supported; "
                     "record with speculative decoding off")


def _segments(record: dict[str, Any], mode: int, n: int, where: str) -> list[int]:
    if mode == MODE_DECODE:
        return [1] * n
    lens = record.get("extend_seq_lens")
    if lens is None:
        raise InputError(f"{where}: missing field 'extend_seq_lens' for an extend pass")
    seg = [int(x) for x in as_int_array(lens, f"{where}: extend_seq_lens", 1)]
    if sum(seg) != n or any(x <= 0 for x in seg):
        raise InputError(f"{where}: extend_seq_lens sum to {sum(seg)} but the pass has {n} tokens")
    return seg


@dataclass
class RankFile:
    """One rank's per_token dump, scanned once: its expert map and what identifies its passes."""

    path: Path
    p2l: np.ndarray  # [R, P]
    rows: np.ndarray  # [L] rows of the recorder's layer axis that hold the MoE layers
    passes_key: bytes  # digest of its passes' positions, token ids and id-array shapes (not the rank)
    records: Callable[[], Iterator[Any]]  # the records again, in file order, tensors as arrays


def import_per_token(paths: list[Path], sink: TraceSink) -> dict[str, Any]:
    """Import per-rank per_token dumps; returns what the summary reports (ranks, duplicate passes skipped).

    Ranks run their forward passes in lockstep (data-parallel attention ranks meet in every MoE layer), so the
    same forward_pass_id on several ranks is one pass: the files are merged by it. A rank file identical to an
    earlier one (tensor-parallel ranks record the same batches) is imported once. Each file is read twice,
    streamed (torch_zip): a first pass for its expert map, which the pickle holds after the records, and for
    what identifies its passes; a second to import the records one at a time. Memory thus holds one record
    per rank file.
    """
    meta = sink.metadata
    next_id = [0]
    ranks: set[int] = set()
    kept: list[RankFile] = []
    duplicates = 0
    for path in paths:
        rank_file = open_rank_file(path, meta)
        first = kept[0].p2l if kept else rank_file.p2l
        if first.shape != rank_file.p2l.shape or not np.array_equal(first, rank_file.p2l):
            raise InputError(f"{path}: last_physical_to_logical_map disagrees with {paths[0]}'s "
                             "(the ranks' expert locations differ)")
        # plain tensor parallelism: this rank recorded exactly another rank's batches
        if any(f.passes_key == rank_file.passes_key and _same_routing(f, rank_file) for f in kept):
            duplicates += 1
            continue
        kept.append(rank_file)
    streams = [_records(f, SequenceTracker(next_id), ranks) for f in kept]
    for _, where, record, f, tracker in heapq.merge(*streams, key=lambda item: item[0]):
        _import_record(record, where, f.rows, f.p2l, tracker, sink, meta.top_k)
    return {"ranks": sorted(ranks), "duplicate_rank_files": duplicates}


def open_rank_file(path: Path, meta: TraceMetadata) -> RankFile:
    """Scan one rank file (torch_zip's streamed reader; torch.load(weights_only=True) for what it does not
    handle, which then holds the file in memory)."""
    try:
        return _scan(path, meta)
    except Unsupported:
        pass
    data = load_torch(path)
    require(data, ("records", "last_physical_to_logical_map"), str(path))
    if not isinstance(data["records"], list):
        raise InputError(f"{path}: 'records' is not a list")
    _compact(path, data["records"])
    p2l = read_map(data["last_physical_to_logical_map"], meta, str(path))
    rows = layer_rows(meta, p2l.shape[0], f"{path}: last_physical_to_logical_map")
    records = data["records"]
    return RankFile(path, p2l, rows, _passes_key(path, iter(records)), lambda: iter(records))


def _scan(path: Path, meta: TraceMetadata) -> RankFile:
    with TorchZip(path) as archive:
        key = _passes_key(path, archive.records(read_tensors=False))
        data = archive.top
    require(data, ("records", "last_physical_to_logical_map"), str(path))
    if not isinstance(data["records"], list):
        raise InputError(f"{path}: 'records' is not a list")
    p2l = read_map(data["last_physical_to_logical_map"], meta, str(path))
    rows = layer_rows(meta, p2l.shape[0], f"{path}: last_physical_to_logical_map")

    def records() -> Iterator[Any]:
        try:
            with TorchZip(path) as again:
                yield from again.records()
        except Unsupported as exc:  # the first pass read the same bytes: only a file changed since fails
            raise InputError(f"{path}: changed while it was imported ({exc})") from exc

    return RankFile(path, p2l, rows, key, records)


def _passes_key(path: Path, records: Iterator[Any]) -> bytes:
    """Digest of a rank file's passes: forward_pass_id, positions, token ids and the shape of the ids."""
    h = hashlib.blake2b(digest_size=16)
    for i, record in enumerate(records):
        where = f"{path}: record {i}"
        require(record, RECORD_KEYS, where)
        topk = record["topk_ids_of_layer"]
        shape = topk.shape if isinstance(topk, (TensorRef, np.ndarray)) else np.shape(topk)
        h.update(f"{record['forward_pass_id']!r}|{tuple(shape)}|".encode())
        for name in ("input_ids", "positions"):
            h.update(fingerprint([as_int_array(record[name], f"{where}: {name}", 1).astype(np.int64)]))
    return h.digest()


def _same_routing(a: RankFile, b: RankFile) -> bool:
    """Whether two rank files with the same passes also chose the same experts (read side by side)."""
    for i, (x, y) in enumerate(zip(a.records(), b.records(), strict=True)):
        ids = [as_int_array(r["topk_ids_of_layer"], f"{f.path}: record {i}: topk_ids_of_layer", 3)
               for r, f in ((x, a), (y, b))]
        if ids[0].shape != ids[1].shape or not np.array_equal(ids[0], ids[1]):
            return False
    return True


def _compact(path: Path, records: list[Any]) -> None:
    """Replace each record's token lists by arrays as soon as a file is loaded: files stay loaded until the
    merge reaches their last pass, and a Python int costs 8 times an array entry."""
    for i, record in enumerate(records):
        if isinstance(record, dict):
            for key in ("input_ids", "positions"):
                if isinstance(record.get(key), list):
                    record[key] = as_int_array(record[key], f"{path}: record {i}: {key}", 1)


def _records(f: RankFile, tracker: SequenceTracker,
             ranks: set[int]) -> Iterator[tuple[int, str, dict[str, Any], RankFile, SequenceTracker]]:
    """One rank's records with their forward_pass_id (checked to increase), for merging by pass."""
    last = -1
    for i, record in enumerate(f.records()):
        where = f"{f.path}: record {i}"
        require(record, RECORD_KEYS, where)
        step = record["forward_pass_id"]
        if not isinstance(step, int) or step < last:
            raise InputError(f"{where}: forward_pass_id {step!r} is not an integer after {last}")
        last = step
        if isinstance(record.get("rank"), int):
            ranks.add(record["rank"])
        yield step, where, record, f, tracker


def _import_record(record: dict[str, Any], where: str, rows: np.ndarray, p2l: np.ndarray,
                   tracker: SequenceTracker, sink: TraceSink, k: int) -> None:
    mode = int(record["forward_mode"])
    input_ids = as_int_array(record["input_ids"], f"{where}: input_ids", 1)
    positions = as_int_array(record["positions"], f"{where}: positions", 1)
    n = input_ids.shape[0]
    if mode == MODE_IDLE or n == 0:
        return
    topk = as_int_array(record["topk_ids_of_layer"], f"{where}: topk_ids_of_layer", 3)  # [R, T, K']
    if positions.shape[0] != n or topk.shape[1] != n:
        raise InputError(f"{where}: input_ids ({n}), positions ({positions.shape[0]}) and topk_ids_of_layer "
                         f"({topk.shape[1]} tokens) disagree on the number of tokens")
    if topk.shape[0] != p2l.shape[0]:
        raise InputError(f"{where}: topk_ids_of_layer has {topk.shape[0]} layers, the expert map "
                         f"{p2l.shape[0]}")
    if topk.shape[2] < k:
        raise InputError(f"{where}: topk_ids_of_layer holds {topk.shape[2]} ids per token, fewer than top-k "
                         f"{k}")
    step = int(record["forward_pass_id"])
    logical = np.empty((n, rows.shape[0], k), dtype=sink.metadata.id_dtype)
    kind, t, layer = physical_to_logical(np.ascontiguousarray(topk), rows, p2l, k, logical)
    if kind == WRONG_COUNT:
        count = int((topk[rows[layer], t] >= 0).sum())
        raise InputError(f"{where}: token {t}, layer {int(rows[layer])} chose {count} experts, not top-k {k} "
                         "(the top-k changes within the file, or --model is not the served model)")
    if kind == PAST_MAP:
        worst = int(topk[rows[layer], t, :k].max())
        raise InputError(f"{where}: physical expert id {worst} is out of range "
                         f"(the expert map has {p2l.shape[1]} physical experts)")
    seg = _segments(record, mode, n, where)
    phase = _phases(mode, positions, seg, where)
    seq = np.empty(n, dtype=np.int64)
    start = 0
    for length in seg:
        seq[start:start + length] = tracker.assign(int(positions[start]), length)
        start += length
    sink.add(seq_id=seq, position=positions, phase=phase, step=np.full(n, step), expert_ids=logical,
             token_id=input_ids, where=where)


def logical_counts_stat(paths: list[Path], meta: TraceMetadata) -> tuple[np.ndarray, int]:
    """`stat` dumps: summed logical counts [L, E] and the number of steps they cover.

    SGLang all-reduces logical_count over ranks before rank 0 writes the file, so one file is the whole
    cluster; several files are several dumps (recording windows) and are summed.
    """
    total = np.zeros((meta.num_moe_layers, meta.num_experts), dtype=np.int64)
    steps = 0
    for path in paths:
        data = load_torch(path)
        require(data, ("logical_count",), str(path))
        counts = as_int_array(data["logical_count"], f"{path}: logical_count", 3)  # [S, R, E]
        if counts.shape[2] != meta.num_experts:
            raise InputError(f"{path}: logical_count has {counts.shape[2]} experts, the model "
                             f"{meta.num_experts}")
        if counts.size and counts.min() < 0:
            raise InputError(f"{path}: logical_count holds a negative count")
        rows = layer_rows(meta, counts.shape[1], f"{path}: logical_count")
        total += counts[:, rows].sum(axis=0)
        steps += counts.shape[0]
    return total, steps


def logical_counts_per_pass(paths: list[Path], meta: TraceMetadata) -> tuple[np.ndarray, int]:
    """`per_pass` dumps: global_physical_count of every pass, folded onto logical experts through each file's
    map. Returns (counts [L, E], passes)."""
    total = np.zeros((meta.num_moe_layers, meta.num_experts), dtype=np.int64)
    passes = 0
    seen: set[bytes] = set()
    for path in paths:
        data = load_torch(path)
        require(data, ("records", "last_physical_to_logical_map"), str(path))
        p2l = read_map(data["last_physical_to_logical_map"], meta, str(path))
        rows = layer_rows(meta, p2l.shape[0], f"{path}: last_physical_to_logical_map")
        if not isinstance(data["records"], list):
            raise InputError(f"{path}: 'records' is not a list")
        counted = []
        for i, record in enumerate(data["records"]):
            where = f"{path}: record {i}"
            require(record, ("global_physical_count",), where)
            counted.append(as_int_array(record["global_physical_count"], f"{where}: global_physical_count",
                                        2))
        parts: list[Any] = [repr(r.get("forward_pass_id")) for r in data["records"]]
        key = fingerprint(parts + counted)
        if key in seen:  # a tensor-parallel rank counted exactly another rank's batches
            continue
        seen.add(key)
        for i, phys in enumerate(counted):
            where = f"{path}: record {i}"
            if phys.shape != p2l.shape:
                raise InputError(f"{where}: global_physical_count has shape {phys.shape}, the expert map "
                                 f"{p2l.shape}")
            if phys.size and phys.min() < 0:
                raise InputError(f"{where}: global_physical_count holds a negative count")
            for j, row in enumerate(rows):
                np.add.at(total[j], p2l[row], phys[row])
            passes += 1
    return total, passes
