"""Start or reach a Dask cluster, map tasks over it in order, and turn its failures into one-line errors."""

from __future__ import annotations

import contextlib
import logging
import os
import re
import uuid
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from traces.errors import InputError
from traces.reader import Trace

CONNECT_SECONDS_ENV = "MOE_TRACE_CONNECT_SECONDS"  # how long to wait for a scheduler (and for its workers)
DEFAULT_CONNECT_SECONDS = 10.0
MAX_LOCAL_WORKERS = 256
INSTALL_HINT = "pip install 'moe-trace[cluster]'"
_SCHEDULER = re.compile(r"((tcp|tls|ws|wss|ucx|inproc)://)?[^\s/:]+(:\d+)?")


@dataclass(frozen=True)
class Address:
    """What --cluster names: local:N, a scheduler address, or a scheduler file (`dask scheduler
    --scheduler-file`, dask-jobqueue)."""

    text: str
    local_workers: int = 0
    scheduler: str | None = None
    scheduler_file: Path | None = None


def parse_address(text: str) -> Address:
    """--cluster's value, checked before anything starts; a one-line InputError for anything else."""
    value = text.strip()
    if value.startswith("local:"):
        count = value.removeprefix("local:")
        if not count.isdigit() or not 1 <= int(count) <= MAX_LOCAL_WORKERS:
            raise InputError(f"--cluster {text}: local:N needs a worker count from 1 to {MAX_LOCAL_WORKERS}")
        return Address(value, local_workers=int(count))
    if value.endswith(".json"):
        path = Path(value).expanduser()
        if not path.is_file():
            raise InputError(f"--cluster {text}: no such scheduler file")
        return Address(value, scheduler_file=path)
    if _SCHEDULER.fullmatch(value) and ("://" in value or ":" in value):
        return Address(value, scheduler=value)
    raise InputError(f"--cluster {text}: expected local:N, a scheduler address such as tcp://host:8786, or a "
                     "scheduler file (.json)")


def connect_seconds() -> float:
    try:
        return max(0.1, float(os.environ.get(CONNECT_SECONDS_ENV, DEFAULT_CONNECT_SECONDS)))
    except ValueError:
        return DEFAULT_CONNECT_SECONDS


class Cluster:
    """A client of a Dask cluster, with the local cluster it started (if any)."""

    def __init__(self, client: Any, address: Address, local: Any = None):
        self.client, self.address, self._local = client, address, local
        self.token = uuid.uuid4().hex  # names this run's open traces on the workers

    @property
    def threads(self) -> int:
        return max(1, sum(self.client.nthreads().values()))

    def share(self, value: Any) -> Any:
        """`value` copied to every worker once; pass the handle to map() as `shared`."""
        return self.client.scatter(value, broadcast=True, hash=False)

    def map(self, fn: Callable[..., Any], trace: Trace, items: Iterable[tuple], shared: Any = None
            ) -> Iterator[Any]:
        """fn(trace, shared, *item) for each item, on the workers, each opening `trace` where it lies; the
        results come back in item order, with at most two tasks per worker thread in flight (so memory stays
        bounded however many items there are)."""
        from distributed import KilledWorker

        from simulator.cluster.worker import run_on_trace

        locations = trace.locations
        limit = 2 * self.threads
        pending: deque[Any] = deque()
        try:
            for item in items:
                pending.append(self.client.submit(run_on_trace, self.token, locations, fn, shared, *item,
                                                  pure=False))
                while len(pending) >= limit:
                    yield pending.popleft().result()
            while pending:
                yield pending.popleft().result()
        except KilledWorker as exc:
            raise InputError(f"--cluster {self.address.text}: a worker died running a task ({exc}); it may "
                             "have run out of memory") from None
        except OSError as exc:  # the scheduler went away (CommClosedError is an OSError)
            raise InputError(f"--cluster {self.address.text}: lost the scheduler ({_first_line(exc)})") \
                from None
        finally:
            for future in pending:
                future.cancel()

    def close(self) -> None:
        from simulator.cluster.worker import forget

        # close the traces this run opened on each worker (one already gone has nothing left to close)
        with contextlib.suppress(Exception):
            self.client.run(forget, self.token)
        self.client.close()
        if self._local is not None:
            self._local.close()


@contextmanager
def open_cluster(text: str | None) -> Iterator[Cluster | None]:
    """The cluster --cluster names (None without it), closed on exit (a local one is stopped)."""
    if text is None:
        yield None
        return
    address = parse_address(text)
    try:
        import distributed
    except ImportError:
        raise InputError(f"--cluster needs dask.distributed: {INSTALL_HINT}") from None
    seconds = connect_seconds()
    local = None
    try:
        if address.local_workers:
            try:  # loopback only, one thread per worker process (a kernel call uses one core), no dashboard
                local = distributed.LocalCluster(n_workers=address.local_workers, threads_per_worker=1,
                                                 processes=True, host="127.0.0.1", dashboard_address=None,
                                                 silence_logs=logging.ERROR)
            except RuntimeError as exc:  # a worker process that could not start
                why = _first_line(exc)
                raise InputError(f"--cluster {text}: could not start the local workers ({why})") from None
            client = distributed.Client(local, timeout=seconds, set_as_default=False)
        elif address.scheduler_file is not None:
            client = distributed.Client(scheduler_file=str(address.scheduler_file), timeout=seconds,
                                        set_as_default=False)
        else:
            client = distributed.Client(address.scheduler, timeout=seconds, set_as_default=False)
    except (OSError, TimeoutError, ValueError) as exc:
        if local is not None:
            local.close()
        raise InputError(f"--cluster {text}: cannot reach a Dask scheduler ({_first_line(exc)}); start one "
                         "with `dask scheduler` and `dask worker`, or use --cluster local:N") from None
    cluster = Cluster(client, address, local)
    try:
        try:
            client.wait_for_workers(1, timeout=seconds)
        except TimeoutError:
            raise InputError(f"--cluster {text}: the scheduler has no workers after {seconds:g} s (start "
                             "some with `dask worker ADDRESS`)") from None
        yield cluster
    finally:
        cluster.close()


def _first_line(exc: BaseException) -> str:
    return str(exc).splitlines()[0] if str(exc) else type(exc).__name__
