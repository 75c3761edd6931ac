"""Time limits around C-library calls on untrusted files: a forked probe of a file's structure, and a deadline
on every data read.

A corrupt HDF5 file can make libhdf5 loop for minutes (or crash) inside one call, where no Python signal
handler runs. The reader therefore first walks the file's structure (attributes, datasets, shapes) in a helper
process: if the helper does not answer within the limit, or dies, the file is reported corrupt in one line,
and the reader never makes the call that would hang. Where fork is missing the probe runs in-process.

Data blocks are read in-process (a helper would have to copy every byte back). Each HDF5 chunk read and
each Arrow batch read runs under `bounded_read`: it notes a deadline, and a watchdog thread checks the
deadlines a few times a second. A call stuck past its deadline cannot be interrupted, so the watchdog ends the
process with the one-line error and exit code 2 the command line gives for any corrupt file. This is switched
on by `exit_on_stuck_reads` (the command line does so; a library user may); otherwise `bounded_read` does
nothing. Either way a normal read pays two dictionary updates under a lock.
"""

from __future__ import annotations

import atexit
import itertools
import os
import pickle
import select
import signal
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

from traces.errors import InputError

PROBE_SECONDS_ENV = "MOE_TRACE_PROBE_SECONDS"
DEFAULT_PROBE_SECONDS = 20.0
READ_SECONDS_ENV = "MOE_TRACE_READ_SECONDS"
DEFAULT_READ_SECONDS = 60.0  # one data block (an HDF5 chunk, an Arrow batch) takes milliseconds


def probe_seconds() -> float:
    try:
        return float(os.environ.get(PROBE_SECONDS_ENV, DEFAULT_PROBE_SECONDS))
    except ValueError:
        return DEFAULT_PROBE_SECONDS


def run_bounded(fn: Callable[..., Any], args: tuple, what: str, seconds: float | None = None) -> Any:
    """fn(*args) (a module-level function, picklable arguments and result), computed in a helper process that
    may take at most `seconds` for it. The helper keeps the working directory it was forked in: pass absolute
    paths.

    An InputError in the helper is raised again here; any other failure, a crash or the time limit is an
    InputError naming `what`. The helper is forked once per process and serves every probe after the first, so
    a probe costs about a millisecond; one that hangs or dies is killed, and the next probe forks a new
    helper.
    """
    limit = probe_seconds() if seconds is None else seconds
    if not hasattr(os, "fork"):
        return fn(*args)
    with _HELPER.lock:
        return _HELPER.call(fn, args, what, limit)


class _Helper:
    """A forked child that runs probes sent over a pipe, one at a time."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.pid: int | None = None
        self.owner = 0
        self.requests = self.replies = -1

    def start(self) -> None:
        req_r, req_w = os.pipe()
        rep_r, rep_w = os.pipe()
        pid = os.fork()
        if pid == 0:  # the helper: never returns into the caller's stack
            try:
                os.close(req_w)
                os.close(rep_r)
                _serve(req_r, rep_w)
            finally:
                os._exit(0)
        os.close(req_r)
        os.close(rep_w)
        self.pid, self.owner, self.requests, self.replies = pid, os.getpid(), req_w, rep_r

    def stop(self) -> None:
        if self.pid is not None and self.owner == os.getpid():
            for fd in (self.requests, self.replies):
                os.close(fd)
            try:
                os.kill(self.pid, signal.SIGKILL)
                os.waitpid(self.pid, 0)
            except (ProcessLookupError, ChildProcessError):
                pass
        self.pid = None

    def call(self, fn: Callable[..., Any], args: tuple, what: str, limit: float) -> Any:
        if self.pid is None or self.owner != os.getpid():  # none yet, or we are a fork of its owner
            self.pid = None
            self.start()
        try:
            _send(self.requests, pickle.dumps((fn, args)))
            reply = _receive(self.replies, time.monotonic() + limit)
        except TimeoutError:
            self.stop()
            raise InputError(f"{what}: reading the file's structure did not finish in {limit:g} s; "
                             "the file is corrupt") from None
        except (EOFError, OSError):
            self.stop()
            raise InputError(f"{what}: the file library crashed reading its structure; the file is "
                             "corrupt") from None
        kind, value = pickle.loads(reply)
        if kind == "ok":
            return value
        if kind == "input":
            raise InputError(value)
        raise InputError(f"{what}: corrupt file structure ({value})")


def _serve(requests: int, replies: int) -> None:
    while True:
        try:
            fn, args = pickle.loads(_receive(requests, None))
        except EOFError:  # the owner closed the pipe or exited
            return
        try:
            payload: tuple[str, Any] = ("ok", fn(*args))
        except InputError as exc:
            payload = ("input", str(exc))
        except BaseException as exc:  # noqa: BLE001 - any failure of the library is reported as corruption
            payload = ("error", f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}")
        _send(replies, pickle.dumps(payload))


def _send(fd: int, data: bytes) -> None:
    view = memoryview(len(data).to_bytes(8, "little") + data)
    while view:
        view = view[os.write(fd, view):]


def _receive(fd: int, deadline: float | None) -> bytes:
    """One length-prefixed message; TimeoutError past the deadline, EOFError when the writer is gone."""
    buffer = b""
    want = 8
    while len(buffer) < want:
        if deadline is not None:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([fd], [], [], left)[0]:
                raise TimeoutError
        data = os.read(fd, max(want - len(buffer), 1 << 16))
        if not data:
            raise EOFError
        buffer += data
        if want == 8 and len(buffer) >= 8:
            want = 8 + int.from_bytes(buffer[:8], "little")
    return buffer[8:want]


_HELPER = _Helper()
atexit.register(_HELPER.stop)


def read_seconds() -> float:
    try:
        return float(os.environ.get(READ_SECONDS_ENV, DEFAULT_READ_SECONDS))
    except ValueError:
        return DEFAULT_READ_SECONDS


class _ReadWatch:
    """The deadlines of the data reads in progress (any thread), and the thread that enforces them."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.active: dict[int, tuple[float, str]] = {}  # token -> (deadline, what is being read)
        self.tokens = itertools.count()
        self.seconds = 0.0  # 0: off
        self.thread: threading.Thread | None = None

    def enable(self, seconds: float) -> None:
        self.seconds = seconds
        if seconds > 0 and (self.thread is None or not self.thread.is_alive()):
            self.thread = threading.Thread(target=self._watch, name="moe-trace read watchdog", daemon=True)
            self.thread.start()

    def after_fork(self) -> None:
        """In a forked child: the lock may have been held by a thread the child does not have, and the
        watchdog thread is gone (the next bounded_read starts one)."""
        self.lock = threading.Lock()
        self.active = {}
        self.thread = None

    def _watch(self) -> None:
        while True:
            time.sleep(min(1.0, max(self.seconds, 0.01) / 4))
            now = time.monotonic()
            with self.lock:
                late = [what for deadline, what in self.active.values() if deadline < now]
            if late:
                os.write(2, f"error: {late[0]}: reading its data did not finish in {self.seconds:g} s; the "
                            "file is corrupt\n".encode())
                os._exit(2)


_READS = _ReadWatch()
if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_READS.after_fork)


def exit_on_stuck_reads(seconds: float | None = None) -> None:
    """From now on, a data read stuck past `seconds` (default $MOE_TRACE_READ_SECONDS or 60) ends the
    process with a one-line error and exit code 2; 0 switches it off."""
    _READS.enable(read_seconds() if seconds is None else seconds)


@contextmanager
def bounded_read(what: str) -> Iterator[None]:
    """Mark a C-library data read of `what` (a path) as in progress, under the deadline when it is on."""
    watch = _READS
    if watch.seconds <= 0:
        yield
        return
    if watch.thread is None:  # a forked child's first read
        watch.enable(watch.seconds)
    token = next(watch.tokens)
    with watch.lock:
        watch.active[token] = (time.monotonic() + watch.seconds, what)
    try:
        yield
    finally:
        with watch.lock:
            del watch.active[token]
