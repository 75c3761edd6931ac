"""GPU timing without launch gaps: the host queues a batch of work behind a sleep kernel, so the GPU then runs
it back to back, and a CUDA event pair around each item times it. Medians over repeats, after warm-up.

This is the equivalent of replaying a CUDA graph: what is timed is the GPU's work, not the Python that
launches it.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence

import numpy as np
import torch

BATCH_ITEMS = 24  # items queued per sleep: well inside the driver's queue of pending launches


class CpuTimer:
    """Wall-clock medians on the CPU (torch's CPU ops finish before they return). For testing the calibration
    pipeline end to end on machines without a GPU; CPU times say nothing about a GPU's."""

    def __init__(self, device: torch.device):
        self.device = device

    def time(self, items: Sequence[Callable[[], object]], repeats: int = 7, warmup: int = 2) -> np.ndarray:
        out = np.zeros((repeats, len(items)))
        for r in range(warmup + repeats):
            for i, fn in enumerate(items):
                t0 = time.perf_counter()
                fn()
                if r >= warmup:
                    out[r - warmup, i] = time.perf_counter() - t0
        return np.median(out, axis=0)


def make_timer(device: torch.device) -> GapFreeTimer | CpuTimer:
    return GapFreeTimer(device) if device.type == "cuda" else CpuTimer(device)


class GapFreeTimer:
    def __init__(self, device: torch.device):
        self.device = device
        self.cycles_per_s = self._sleep_rate()

    def _sleep_rate(self) -> float:
        """Clock cycles per second of torch.cuda._sleep, measured (clocks move with boost)."""
        torch.cuda.synchronize(self.device)
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        cycles = 20_000_000
        torch.cuda._sleep(1_000_000)  # wake the clocks
        start.record()
        torch.cuda._sleep(cycles)
        end.record()
        end.synchronize()
        return cycles / (start.elapsed_time(end) / 1e3)

    def time(self, items: Sequence[Callable[[], object]], repeats: int = 7, warmup: int = 2) -> np.ndarray:
        """Median seconds of each item [len(items)], each run `warmup + repeats` times."""
        out = np.zeros((repeats, len(items)))
        for r in range(warmup + repeats):
            for b0 in range(0, len(items), BATCH_ITEMS):
                batch = items[b0: b0 + BATCH_ITEMS]
                secs = self._run_batch(batch)
                if r >= warmup:
                    out[r - warmup, b0: b0 + len(batch)] = secs
        return np.median(out, axis=0)

    def _run_batch(self, batch: Sequence[Callable[[], object]]) -> np.ndarray:
        events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in batch]
        torch.cuda.synchronize(self.device)
        host_s = getattr(self, "_host_s_per_item", 2e-4) * len(batch)
        torch.cuda._sleep(int(self.cycles_per_s * min(2.0 * host_s + 2e-3, 0.5)))
        t0 = time.perf_counter()
        for (start, end), fn in zip(events, batch, strict=True):
            start.record()
            fn()
            end.record()
        # learn how long the host takes to queue an item, so the next sleep covers the whole batch
        self._host_s_per_item = max((time.perf_counter() - t0) / len(batch), 1e-5)
        torch.cuda.synchronize(self.device)
        return np.array([s.elapsed_time(e) / 1e3 for s, e in events])
