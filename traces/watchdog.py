"""Run a C-library probe of an untrusted file in a forked child with a time limit.

A corrupt HDF5 file can make libhdf5 loop for minutes (or crash) inside one call, where no Python signal handler
runs. The reader therefore first walks the file's structure (attributes, datasets, shapes) in a child process:
if the child does not answer within the limit, or dies, the file is reported corrupt in one line, and the parent
never makes the call that would hang. Where fork is missing the probe runs in-process.
"""

from __future__ import annotations

import os
import pickle
import select
import signal
import time
from collections.abc import Callable
from typing import Any

from traces.errors import InputError

PROBE_SECONDS_ENV = "MOE_TRACE_PROBE_SECONDS"
DEFAULT_PROBE_SECONDS = 20.0


def probe_seconds() -> float:
    try:
        return float(os.environ.get(PROBE_SECONDS_ENV, DEFAULT_PROBE_SECONDS))
    except ValueError:
        return DEFAULT_PROBE_SECONDS


def run_bounded(fn: Callable[[], Any], what: str, seconds: float | None = None) -> Any:
    """fn()'s result (picklable), computed in a child process that may run at most `seconds`.

    An InputError in the child is raised again here; any other failure, a crash or the time limit is an InputError
    naming `what`.
    """
    limit = probe_seconds() if seconds is None else seconds
    if not hasattr(os, "fork"):
        return fn()
    read_fd, write_fd = os.pipe()
    pid = os.fork()
    if pid == 0:  # child: never return into the caller's stack
        os.close(read_fd)
        try:
            try:
                payload = ("ok", fn())
            except InputError as exc:
                payload = ("input", str(exc))
            except BaseException as exc:  # noqa: BLE001 - any failure of the library is reported as corruption
                payload = ("error", f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}")
            data = pickle.dumps(payload)
            with os.fdopen(write_fd, "wb") as out:
                out.write(data)
        finally:
            os._exit(0)
    os.close(write_fd)
    chunks: list[bytes] = []
    deadline = time.monotonic() + limit
    try:
        while True:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([read_fd], [], [], left)[0]:
                os.kill(pid, signal.SIGKILL)
                raise InputError(f"{what}: reading the file's structure did not finish in {limit:g} s; "
                                 "the file is corrupt")
            data = os.read(read_fd, 1 << 16)
            if not data:
                break
            chunks.append(data)
    finally:
        os.close(read_fd)
        _, status = os.waitpid(pid, 0)
    if not chunks:
        how = f"signal {-os.waitstatus_to_exitcode(status)}" if os.WIFSIGNALED(status) else "no answer"
        raise InputError(f"{what}: the file library crashed reading its structure ({how}); the file is corrupt")
    kind, value = pickle.loads(b"".join(chunks))
    if kind == "ok":
        return value
    if kind == "input":
        raise InputError(value)
    raise InputError(f"{what}: corrupt file structure ({value})")
