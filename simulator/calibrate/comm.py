"""Expert-parallel all-to-all calibration: NCCL `all_to_all_single` with per-pair split sizes from a routing
trace.

Dispatch sends each token's hidden state once to every other GPU that holds one of its experts; combine sends
the expert outputs back along the transposed matrix. Both are timed over message sizes from decode-sized to
prefill-sized batches, and `fit_link` turns the times into the cost model's latency + bytes / bandwidth per
GPU (the `communication` section of a profile, simulator/profiles.py). The same code runs on CPU with gloo for
tests.
"""

from __future__ import annotations

import os
import pickle
import socket
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist


def pair_token_counts(expert_ids: np.ndarray, slot_gpu_of_expert: np.ndarray, num_gpus: int) -> np.ndarray:
    """Tokens each GPU sends to each other GPU in one layer's dispatch.

    `expert_ids` is [T, K], the experts each token is routed to (negative ids, padding, are ignored); token t
    starts on rank t % num_gpus, and expert e lives on GPU `slot_gpu_of_expert[e]`. A token is sent once to
    each distinct remote GPU among its experts' (two experts on the same GPU share one copy) and never to its
    own GPU. Returns counts[src, dst] as a [G, G] int64 matrix with a zero diagonal.
    """
    ids = np.asarray(expert_ids)
    if ids.ndim != 2:
        raise ValueError(f"expert_ids must be [tokens, top_k], got shape {ids.shape}")
    slot_gpu = np.asarray(slot_gpu_of_expert, dtype=np.int64)
    tokens = ids.shape[0]
    src = np.arange(tokens, dtype=np.int64) % num_gpus
    valid = ids >= 0
    dst = slot_gpu[np.where(valid, ids, 0)]
    hit = np.zeros((tokens, num_gpus), dtype=bool)  # hit[t, g]: token t goes to GPU g
    rows = np.broadcast_to(np.arange(tokens)[:, None], ids.shape)
    hit[rows[valid], dst[valid]] = True
    hit[np.arange(tokens), src] = False
    counts = np.zeros((num_gpus, num_gpus), dtype=np.int64)
    np.add.at(counts, src, hit.astype(np.int64))
    return counts


def scaled_pair_counts(pairs: np.ndarray, tokens_per_gpu: int, tokens_in_sample: int) -> np.ndarray:
    """Scale a matrix sampled from `tokens_in_sample` tokens in all (spread over G = pairs.shape[0] GPUs) to a
    batch of `tokens_per_gpu` tokens on each GPU: counts rounded to integers, at most `tokens_per_gpu`
    each."""
    pairs = np.asarray(pairs, dtype=np.int64)
    if tokens_in_sample <= 0:
        raise ValueError("tokens_in_sample must be positive")
    factor = tokens_per_gpu * pairs.shape[0] / tokens_in_sample
    scaled = np.clip(np.rint(pairs * factor), 0, tokens_per_gpu).astype(np.int64)
    np.fill_diagonal(scaled, 0)
    return scaled


def _bytes_per_gpu(pairs: np.ndarray, hidden_size: int, element_size: int) -> int:
    rows = np.maximum(pairs.sum(axis=1), pairs.sum(axis=0))  # sent, received per rank
    return int(rows.max()) * hidden_size * element_size if rows.size else 0


def _fill(rank: int, splits: Sequence[int], hidden_size: int, dtype: torch.dtype,
          device: torch.device) -> torch.Tensor:
    """Rows for an exchange check: every value is the sender's rank, except column 1 which is the
    destination."""
    out = torch.full((sum(splits), hidden_size), float(rank), dtype=dtype, device=device)
    if hidden_size > 1:
        dsts = torch.repeat_interleave(torch.arange(len(splits), device=device),
                                       torch.tensor(splits, device=device))
        out[:, 1] = dsts.to(dtype)
    return out


def _verify(received: torch.Tensor, splits: Sequence[int], sender_of: Callable[[int], int],
            dest_of: Callable[[int], int], what: str) -> None:
    start = 0
    for peer, n in enumerate(splits):
        block = received[start:start + n].float()
        start += n
        want = torch.full_like(block, float(sender_of(peer)))
        if block.shape[1] > 1:
            want[:, 1] = float(dest_of(peer))
        if not torch.equal(block, want):
            raise RuntimeError(f"all-to-all {what}: rank {dist.get_rank()} got wrong rows in the block of "
                               f"peer {peer}")


def measure_all_to_all(pairs_list: list[np.ndarray], hidden_size: int, *, repeats: int = 10, warmup: int = 3,
                       dtype: torch.dtype = torch.bfloat16, check: bool = False) -> list[dict[str, float]]:
    """Time dispatch and combine for each pair-count matrix; call on every rank of an initialised process
    group.

    Rank r sends pairs[r, d] rows of `hidden_size` to rank d (dispatch), then the transposed exchange
    (combine). Each repeat's time is the slowest rank's; the result per matrix is {"bytes_per_gpu": the
    largest of any rank's sent or received bytes, "dispatch_s", "combine_s": medians over repeats}. With
    `check`, one untimed exchange first verifies that every rank receives exactly the rows meant for it
    (raises RuntimeError if not).
    """
    rank, world = dist.get_rank(), dist.get_world_size()
    cuda = dist.get_backend() == "nccl"
    device = torch.device("cuda", torch.cuda.current_device()) if cuda else torch.device("cpu")
    element_size = torch.empty((), dtype=dtype).element_size()

    def sync() -> None:
        if cuda:
            torch.cuda.synchronize()

    results: list[dict[str, float]] = []
    for pairs in pairs_list:
        pairs = np.asarray(pairs, dtype=np.int64)
        if pairs.shape != (world, world):
            raise ValueError(f"pair matrix of shape {pairs.shape} for a world of {world} ranks")
        send = [int(n) for n in pairs[rank, :]]  # dispatch: rows to each rank
        recv = [int(n) for n in pairs[:, rank]]  # dispatch: rows from each rank
        if check:
            sent = _fill(rank, send, hidden_size, dtype, device)
            got = torch.empty((sum(recv), hidden_size), dtype=dtype, device=device)
            dist.all_to_all_single(got, sent, recv, send)
            _verify(got, recv, lambda peer: peer, lambda peer: rank, "dispatch")
            back = torch.empty_like(sent)
            dist.all_to_all_single(back, got, send, recv)
            _verify(back, send, lambda peer: rank, lambda peer: peer, "combine")
        x = torch.randn((sum(send), hidden_size), device=device).to(dtype)
        y = torch.empty((sum(recv), hidden_size), dtype=dtype, device=device)
        z = torch.empty_like(x)
        times = torch.zeros((repeats, 2), dtype=torch.float64)
        for i in range(warmup + repeats):
            for j, (out, inp, out_splits, in_splits) in enumerate([(y, x, recv, send), (z, y, send, recv)]):
                sync()
                dist.barrier()
                sync()
                if cuda:
                    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                    start.record()
                    dist.all_to_all_single(out, inp, out_splits, in_splits)
                    end.record()
                    end.synchronize()
                    elapsed = start.elapsed_time(end) / 1e3
                else:
                    t0 = time.perf_counter()
                    dist.all_to_all_single(out, inp, out_splits, in_splits)
                    elapsed = time.perf_counter() - t0
                if i >= warmup:
                    times[i - warmup, j] = elapsed
        slowest = times.to(device)
        dist.all_reduce(slowest, op=dist.ReduceOp.MAX)
        slowest = slowest.cpu()
        results.append({"bytes_per_gpu": _bytes_per_gpu(pairs, hidden_size, element_size),
                        "dispatch_s": float(slowest[:, 0].median()) if repeats else float("nan"),
                        "combine_s": float(slowest[:, 1].median()) if repeats else float("nan")})
    return results


def _fit_one(x: np.ndarray, y: np.ndarray) -> tuple[float, float]:
    """time = latency + x * slope by least squares, latency >= 0; returns (slope, latency)."""
    if len(x) >= 2 and np.ptp(x) > 0:
        slope, latency = np.polyfit(x, y, 1)
        if latency >= 0 and slope > 0:
            return float(slope), float(latency)
    # a negative latency, or times that do not grow with size: fit through zero (a conservative bandwidth)
    return float(x @ y / (x @ x)), 0.0


def fit_link(points: list[dict[str, float]]) -> tuple[float, float, float]:
    """Fit time = latency + bytes_per_gpu / bandwidth to dispatch and to combine times by least squares
    (latency kept non-negative by refitting through zero). Returns (dispatch_bytes_per_s, combine_bytes_per_s,
    latency_s), the latency the mean of the two fits'."""
    used = [p for p in points if p["bytes_per_gpu"] > 0]
    if not used:
        raise ValueError("fit_link needs a point with bytes_per_gpu > 0")
    x = np.array([p["bytes_per_gpu"] for p in used], dtype=np.float64)
    d_slope, d_lat = _fit_one(x, np.array([p["dispatch_s"] for p in used], dtype=np.float64))
    c_slope, c_lat = _fit_one(x, np.array([p["combine_s"] for p in used], dtype=np.float64))
    return 1.0 / d_slope, 1.0 / c_slope, (d_lat + c_lat) / 2


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _rank_main(rank: int, world_size: int, backend: str, port: int, out: str, fn: Callable[..., Any],
               args: tuple[Any, ...]) -> None:
    device = None
    if backend == "nccl":
        os.environ["NCCL_NVLS_ENABLE"] = "0"  # no NVLink multicast
        torch.cuda.set_device(rank)
        device = torch.device("cuda", rank)
    dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size,
                            device_id=device)
    try:
        result = fn(rank, world_size, *args)
        if rank == 0:
            Path(out).write_bytes(pickle.dumps(result))
    finally:
        dist.destroy_process_group()


def run_on_ranks(world_size: int, fn: Callable[..., Any], *args: Any, backend: str = "gloo") -> Any:
    """Run fn(rank, world_size, *args) on `world_size` spawned processes joined in a process group on
    127.0.0.1 (gloo on CPU, or nccl with one GPU per rank) and return rank 0's result. `fn` must be a
    module-level function."""
    import torch.multiprocessing as mp

    if backend not in ("gloo", "nccl"):
        raise ValueError(f"backend must be gloo or nccl, not {backend!r}")
    with tempfile.TemporaryDirectory(prefix="moe-sim-comm-") as tmp:
        out = str(Path(tmp) / "rank0.pkl")
        mp.spawn(_rank_main, args=(world_size, backend, _free_port(), out, fn, args), nprocs=world_size,
                 join=True, start_method="spawn")
        return pickle.loads(Path(out).read_bytes())


def _measure_on_rank(rank: int, world_size: int, pairs_list: list[np.ndarray], hidden_size: int, repeats: int,
                     warmup: int, dtype: torch.dtype, check: bool) -> list[dict[str, float]]:
    return measure_all_to_all(pairs_list, hidden_size, repeats=repeats, warmup=warmup, dtype=dtype,
                              check=check)


def calibrate_all_to_all(expert_ids_layer: np.ndarray, slot_gpu_of_expert: np.ndarray, hidden_size: int,
                         num_gpus: int, tokens_per_gpu: tuple[int, ...] = (16, 128, 1024, 4096),
                         backend: str = "nccl", repeats: int = 10) -> dict[str, Any]:
    """Measure dispatch and combine on `num_gpus` ranks for batches of `tokens_per_gpu` tokens per GPU routed
    like `expert_ids_layer` ([T, K], one layer), in bf16, and fit the link: the `communication` section of a
    profile."""
    sample = pair_token_counts(expert_ids_layer, slot_gpu_of_expert, num_gpus)
    pairs_list = [scaled_pair_counts(sample, n, len(expert_ids_layer)) for n in tokens_per_gpu]
    measured = run_on_ranks(num_gpus, _measure_on_rank, pairs_list, hidden_size, repeats, 2, torch.bfloat16,
                            False, backend=backend)
    points = [{"tokens_per_gpu": n, **m} for n, m in zip(tokens_per_gpu, measured, strict=True)]
    dispatch, combine, latency = fit_link(points)
    return {"source": "measured", "dispatch_bytes_per_s": dispatch, "combine_bytes_per_s": combine,
            "latency_s": latency, "points": points}
