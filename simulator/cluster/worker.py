"""What a cluster task runs on a worker: the trace, opened where it lies once per worker thread and run, then
the task on it."""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

from traces.errors import InputError
from traces.reader import Trace, open_trace

KEEP_RUNS = 4  # runs whose traces stay open on a worker (a driver that died never says `forget`)

_OPEN: dict[tuple[str, tuple[str, ...], int], Trace] = {}  # (run, locations, thread) -> open trace
_RUNS: list[str] = []  # run tokens with open traces, oldest first
_LOCK = threading.Lock()


def run_on_trace(token: str, locations: list[str], fn: Callable[..., Any], shared: Any, *args: Any) -> Any:
    """fn(trace, shared, *args) with the trace at `locations` open on this thread (trace readers are not
    shared between threads)."""
    key = (token, tuple(locations), threading.get_ident())
    with _LOCK:
        trace = _OPEN.get(key)
    if trace is None:
        trace = _open(locations)
        with _LOCK:
            if token not in _RUNS:
                _RUNS.append(token)
                for old in _RUNS[:-KEEP_RUNS]:
                    _close(old)
            _OPEN[key] = trace
    return fn(trace, shared, *args)


def forget(token: str) -> None:
    """Close the traces the run `token` opened here (Cluster.close runs this on every worker)."""
    with _LOCK:
        _close(token)


def _close(token: str) -> None:
    for key in [k for k in _OPEN if k[0] == token]:
        _OPEN.pop(key).close()
    if token in _RUNS:
        _RUNS.remove(token)


def _open(locations: list[str]) -> Trace:
    try:
        return open_trace(locations)
    except InputError as exc:
        hint = (" (every worker opens the trace itself: keep it on a filesystem all workers mount at the "
                "same path, or give an fsspec URL such as s3://...)") if "no such file" in str(exc) else ""
        raise InputError(f"on worker {_worker_address()}: {exc}{hint}") from None


def _worker_address() -> str:
    try:
        from distributed import get_worker

        return str(get_worker().address)
    except (ImportError, ValueError):
        return "(not a Dask worker)"
