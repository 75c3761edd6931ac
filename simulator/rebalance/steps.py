"""Per-step expert loads [L, E], streamed from a trace: recorded forward passes, or steps regrouped per phase.

Shape legend: T tokens, L MoE layers, E experts, K top-k.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from functools import cache

import numpy as np

from simulator import kernels
from traces.errors import InputError
from traces.reader import DEFAULT_CHUNK_TOKENS, Trace
from traces.schema import PHASE_NAMES

_PIECE_ENTRIES = 1 << 22  # bound on a per-step bincount's size: [steps in piece, L, E] counts


@cache
def phase_stride() -> int:
    """Key distance between the phases' regrouped steps, as kernels.step_key lays keys out (one
    definition)."""
    return int(kernels.step_key(1, 0, 0, 1)) - int(kernels.step_key(0, 0, 0, 1))


def iter_step_loads(
    trace: Trace,
    *,
    phase: str | None = None,
    tokens_per_step: int | None = None,
    chunk_tokens: int = DEFAULT_CHUNK_TOKENS,
    progress: Callable[[int], None] | None = None,
) -> Iterator[np.ndarray]:
    """Yield each step's expert load [L, E] int32, in trace order.

    A step is a recorded forward pass (consecutive tokens sharing a `step` value), or, with tokens_per_step B,
    each B consecutive tokens of one phase (kernels.step_key): prefill and decode fill steps apart, as
    plan regroups them, so a phase switch does not cut a step short; a regrouped step is yielded when its
    phase's next step begins (or at the end), so steps come in the order they complete. phase ("prefill" /
    "decode") keeps only that phase's tokens ("all" or None: both). A step that spans chunk boundaries is
    yielded once, whole.
    """
    if tokens_per_step is not None and tokens_per_step < 1:
        raise InputError(f"--tokens-per-step must be at least 1, not {tokens_per_step}")
    meta = trace.metadata
    L, E = meta.num_moe_layers, meta.num_experts
    phase_code = _phase_code(phase)
    # open steps, possibly unfinished, by lane: one lane for recorded passes, one per phase for regrouped
    # steps
    pending: dict[int, tuple[int, np.ndarray]] = {}
    kept = np.zeros(2, dtype=np.int64)  # tokens kept so far per phase (for tokens_per_step grouping)
    piece_tokens = max(1, _PIECE_ENTRIES // (L * E))
    stride = phase_stride()
    for chunk in trace.iter_chunks(("expert_ids", "step", "phase"), chunk_tokens=chunk_tokens):
        n = chunk.num_tokens
        ids, step, phases = chunk.expert_ids, chunk.step, chunk.phase
        assert ids is not None and step is not None and phases is not None
        if phase_code is not None:
            mask = phases == phase_code
            ids, step, phases = ids[mask], step[mask], phases[mask]
        keys = _step_keys(step, phases, tokens_per_step, kept)
        for start in range(0, ids.shape[0], piece_tokens):
            piece = ids[start:start + piece_tokens]  # [T, L, K]
            key = keys[start:start + piece_tokens]
            for load, k in _group_loads(piece, key, E):
                lane = 0 if tokens_per_step is None else k // stride
                if lane in pending and pending[lane][0] == k:
                    pending[lane][1][...] += load
                    continue
                if lane in pending:
                    yield pending.pop(lane)[1]
                pending[lane] = (k, load)
        if progress is not None:
            progress(n)
    yield from (load for _, load in pending.values())  # in the order they were opened


def _step_keys(step: np.ndarray, phases: np.ndarray, tokens_per_step: int | None,
               kept: np.ndarray) -> np.ndarray:
    """[T] key of each token's step (recorded: a step is a run of tokens with one key; regrouped: every token
    of a key, B per phase, however the phases interleave). kept: [2] tokens per phase
    before this chunk (updated). Regrouped steps count tokens per phase, as the replay kernels
    (kernels.step_key)."""
    if tokens_per_step is None:
        return step.astype(np.int64)
    keys = np.empty(step.shape[0], dtype=np.int64)
    for code in (0, 1):
        where = np.flatnonzero(phases == code)
        keys[where] = code * phase_stride() + (kept[code] + np.arange(where.size)) // tokens_per_step
        kept[code] += where.size
    return keys


def count_steps(trace: Trace, *, phase: str | None = None, tokens_per_step: int | None = None,
                chunk_tokens: int = DEFAULT_CHUNK_TOKENS) -> int:
    """Number of steps iter_step_loads would yield, reading only the step and phase columns."""
    phase_code = _phase_code(phase)
    kept = np.zeros(2, dtype=np.int64)
    if tokens_per_step is not None:  # regrouped: each phase's kept tokens fill steps of their own
        for chunk in trace.iter_chunks(("phase",), chunk_tokens=chunk_tokens):
            assert chunk.phase is not None
            codes = np.bincount(chunk.phase, minlength=2)[:2]
            kept += codes if phase_code is None else np.where(np.arange(2) == phase_code, codes, 0)
        return int((-(-kept // tokens_per_step)).sum())
    count, last = 0, None
    for chunk in trace.iter_chunks(("step", "phase"), chunk_tokens=chunk_tokens):
        step, phases = chunk.step, chunk.phase
        assert step is not None and phases is not None
        if phase_code is not None:
            step, phases = step[phases == phase_code], phases[phases == phase_code]
        if step.size == 0:
            continue
        keys = _step_keys(step, phases, tokens_per_step, kept)
        count += int((keys[1:] != keys[:-1]).sum()) + int(last is None or keys[0] != last)
        last = keys[-1]
    return count


def _phase_code(phase: str | None) -> int | None:
    if phase is None or phase == "all":
        return None
    codes = {name: code for code, name in PHASE_NAMES.items()}
    if phase not in codes:
        raise InputError(f"--phase must be one of all, {', '.join(codes)}, not {phase!r}")
    return codes[phase]


def _group_loads(ids: np.ndarray, key: np.ndarray, num_experts: int) -> list[tuple[np.ndarray, int]]:
    """Split tokens into runs of equal key and count each run's load. ids: [T, L, K] -> [(load [L, E],
    key)]."""
    if ids.shape[0] == 0:
        return []
    _, L, _ = ids.shape
    new_run = np.empty(key.size, dtype=np.int64)
    new_run[0] = 0
    new_run[1:] = key[1:] != key[:-1]
    run = np.cumsum(new_run)  # [T] run index of each token
    runs = int(run[-1]) + 1
    flat = ((run[:, None, None] * L + np.arange(L)[None, :, None]) * num_experts + ids).ravel()
    counts = np.bincount(flat, minlength=runs * L * num_experts).astype(np.int32).reshape(runs, L,
                                                                                          num_experts)
    firsts = np.flatnonzero(np.concatenate([[1], new_run[1:]]))
    # copies: a view would keep the whole [runs, L, E] buffer alive as long as any one step is held
    return [(counts[r].copy(), int(key[firsts[r]])) for r in range(runs)]


