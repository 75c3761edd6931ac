"""Helpers the simulator's commands share: comma-separated option values and progress bars on stderr."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

import click
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from simulator.options import DISPATCH_POLICIES
from traces.errors import InputError

ProgressFactory = Callable[[str, int], Callable[[int], None] | None]  # (label, total tokens) -> advance(n)


def _set_workers(_ctx: click.Context, _param: click.Parameter, value: int | None) -> int | None:
    from simulator.kernels import set_workers

    set_workers(value)  # raises InputError naming the limit
    return value


workers_option = click.option(
    "--workers", type=int, default=None, expose_value=False, callback=_set_workers, metavar="N",
    help="Threads the replay kernel spreads its placements and layouts over (default: every core). Results "
         "are identical for any N.")


def _check_cluster(_ctx: click.Context, _param: click.Parameter, value: str | None) -> str | None:
    if value is not None:
        from simulator.cluster import parse_address

        parse_address(value)  # a malformed address fails before anything is read or started
    return value


cluster_option = click.option(
    "--cluster", default=None, metavar="ADDRESS", callback=_check_cluster,
    help="Run on a Dask cluster: local:N starts N worker processes on this machine; tcp://HOST:PORT, or a "
         "scheduler file (.json), joins a running scheduler. Each worker reads the trace itself: keep it on "
         "a filesystem every worker mounts at the same path, or give an fsspec URL (s3://, gs://). Results "
         "are identical to a run without it (docs/scale.md). Needs pip install 'moe-trace[cluster]'.")


dispatch_option = click.option(
    "--dispatch", type=click.Choice(list(DISPATCH_POLICIES)), default="static", show_default=True,
    help="How a step's tokens of an expert split over its replicas: static (a token's own GPU if it holds "
         "one, else a fixed rotation by token index), round-robin (equal shares), least-loaded (waterfill "
         "the replicas so the busiest GPU stays lowest), lp (the split with the lowest busiest GPU, exact). "
         "docs/simulator.md defines them.")


def int_list(text: str, option: str) -> list[int]:
    """`--gpus 8,16` -> [8, 16]; a one-line InputError naming the option otherwise."""
    try:
        values = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise InputError(f"{option}: expected comma-separated integers, got {text!r}") from None
    if not values:
        raise InputError(f"{option}: give at least one value")
    return values


def names(text: str) -> list[str]:
    """`a, b,,c` -> ["a", "b", "c"]."""
    return [x.strip() for x in text.split(",") if x.strip()]


@contextmanager
def progress_bars(quiet: bool) -> Iterator[ProgressFactory]:
    """A rich progress display on stderr; each pass over the trace gets its own bar (none when quiet)."""
    if quiet:
        yield lambda label, total: None
        return
    columns = (TextColumn("{task.description:>9}"), BarColumn(), MofNCompleteColumn(), TextColumn("tokens"),
               TimeRemainingColumn())
    with Progress(*columns, console=Console(stderr=True), transient=True) as progress:
        def factory(label: str, total: int) -> Callable[[int], None]:
            task = progress.add_task(label, total=total)
            return lambda n: progress.advance(task, n)

        yield factory


@contextmanager
def progress_bar(total: int, label: str, quiet: bool) -> Iterator[Callable[[int], None] | None]:
    """One bar of `total` tokens (None when quiet)."""
    with progress_bars(quiet) as bars:
        yield bars(label, total)
