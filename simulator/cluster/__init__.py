"""Sweeps on a Dask cluster: `--cluster local:N` or a scheduler's address.

The driver (the process running `moe-sim`) cuts the work into tasks that name a token range, an interval or
a grid point, never data: each worker opens the trace itself, where it lies (a filesystem every worker mounts
at the same path, or an fsspec URL), reads only its range, and sends back the small mergeable result (a
replay Segment's state, fit counts, a rebalance result). The driver merges the results in trace order with
the same code the single-process run uses, so results are bit-identical to it.

Modules: connect (Cluster: start or reach a cluster, ordered task maps, one-line errors), worker (what runs on
a worker: the trace opened once per worker thread and run). The tasks themselves live beside the code they
distribute (replay.segment, replay.fitting, rebalance.config). dask.distributed is imported only when
--cluster is given (`pip install 'moe-trace[cluster]'`).
"""

from simulator.cluster.connect import CONNECT_SECONDS_ENV, Cluster, open_cluster, parse_address

__all__ = ["CONNECT_SECONDS_ENV", "Cluster", "open_cluster", "parse_address"]
