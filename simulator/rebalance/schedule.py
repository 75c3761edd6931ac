"""The replay of refit schedules over per-step loads: rebalanced every W steps from the last N, against fixed
and oracle placements scored on the same steps (the package docstring explains the schedules).

Shape legend: L MoE layers, E experts, G GPUs, S slots per GPU, B steps scored together.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import numpy as np

from simulator import metrics
from simulator.rebalance.result import SCHEDULES, RebalanceResult, RefitPrices
from simulator.rebalance.scoring import align_gpus, copies_received, gpu_share, score_steps
from traces.errors import InputError

FitFn = Callable[[np.ndarray], np.ndarray]  # load [L, E] -> slots [L, G, S]


class RebalanceReplay:
    """One (W, N) schedule over the per-step loads [L, E], pushed in order.

    Steps 0..N-1 are the warm-up window. At scored step t = N + j*W the rebalanced placement is refitted from
    steps [t-N, t); the fixed placement is the fit at j = 0; both are scored on every step as it comes (in
    small blocks). The oracle of an interval is fitted on the interval's own load, so its steps can only be
    scored once the interval is complete: intervals of up to `buffer_steps` steps are held and scored when
    they close; longer ones keep only their [L, E] sum, and their steps are scored in a second pass
    (push_oracle). Memory is thus the window, at most buffer_steps steps, and one sum per long interval.
    """

    BLOCK = 256  # steps scored together
    BUFFER_BYTES = 64 << 20  # steps of one interval held in memory for the oracle, at most this many bytes

    def __init__(self, every: int, window: int, fit: FitFn, num_experts: int, expert_bytes: int,
                 gpus_per_node: int | None = None, buffer_steps: int | None = None,
                 prices: RefitPrices | None = None, dense_layers: int = 0):
        if every < 1:
            raise InputError(f"--rebalance-every must be at least 1 step, not {every}")
        if window < 1:
            raise InputError(f"--window must be at least 1 step, not {window}")
        self.every, self.window, self.fit = every, window, fit
        self.num_experts, self.expert_bytes = num_experts, expert_bytes
        self.prices = prices or RefitPrices.unit()
        self.dense_layers = dense_layers  # decoder layers without experts (SGLang's balancedness counts them)
        self.gpus_per_node = gpus_per_node  # None: one node (GPUs renumbered freely)
        self.buffer_steps = buffer_steps  # None: from BUFFER_BYTES and the first step's size
        self.steps = 0
        self._window: deque[np.ndarray] = deque()
        self._window_sum: np.ndarray | None = None  # [L, E] int64
        self._interval: list[np.ndarray] = []  # the open interval's steps (buffered oracle only)
        self._interval_sums: list[np.ndarray] = []  # [L, E] int64 per interval (second-pass oracle only)
        self._block: list[np.ndarray] = []  # scored steps not yet scored
        self._shares: dict[str, np.ndarray] = {}  # schedule -> share [L, E, G] in force
        self._current_slots: np.ndarray | None = None
        self._peaks: dict[str, list[np.ndarray]] = {name: [] for name in SCHEDULES}
        self._means: dict[str, list[np.ndarray]] = {name: [] for name in SCHEDULES}
        self._sglang: dict[str, list[np.ndarray]] = {name: [] for name in SCHEDULES}  # per-step layer sums
        self._gpu_load: dict[str, np.ndarray] = {}  # schedule -> [L, G] load summed over the scored steps
        # schedule -> expert seconds, scored steps
        self._seconds: dict[str, float] = dict.fromkeys(SCHEDULES, 0.0)
        self._moved: list[int] = []
        self._busiest: list[int] = []
        self._oracle_step = 0

    @property
    def needs_second_pass(self) -> bool:
        """True when intervals are too long to hold: call push_oracle with the same steps again."""
        return self.buffer_steps is not None and self.every > self.buffer_steps

    def push(self, load: np.ndarray) -> None:
        if self.buffer_steps is None:
            self.buffer_steps = max(1, self.BUFFER_BYTES // max(load.nbytes, 1))
        t = self.steps
        if t >= self.window:
            if (t - self.window) % self.every == 0:
                self._flush(("fixed", "rebalanced"))
                self._close_interval()
                self._refit()
                if self.needs_second_pass:
                    self._interval_sums.append(np.zeros(load.shape, dtype=np.int64))
            if self.needs_second_pass:
                self._interval_sums[-1] += load
            else:
                self._interval.append(load)
            self._block.append(load)
            if len(self._block) >= self.BLOCK:
                self._flush(("fixed", "rebalanced"))
        self._window.append(load)
        self._window_sum = load.astype(np.int64) if self._window_sum is None else self._window_sum + load
        if len(self._window) > self.window:
            self._window_sum -= self._window.popleft()
        self.steps += 1

    def _close_interval(self) -> None:
        """Fit the buffered interval's oracle and score its steps."""
        if not self._interval:
            return
        total = np.zeros(self._interval[0].shape, dtype=np.int64)
        for load in self._interval:
            total += load
        share = gpu_share(np.asarray(self.fit(total)), self.num_experts)
        for start in range(0, len(self._interval), self.BLOCK):
            self._score("oracle", np.stack(self._interval[start:start + self.BLOCK]), share)
        self._interval = []

    def _score(self, name: str, loads: np.ndarray, share: np.ndarray) -> None:
        peak, mean, gpu, seconds, sglang = score_steps(loads, share, self.prices.seconds_per_assignment,
                                                       self.prices.seconds_per_expert_read)
        self._sglang[name].append(sglang)
        self._seconds[name] += float(seconds.sum())
        self._peaks[name].append(peak)
        self._means[name].append(mean)
        self._gpu_load[name] = self._gpu_load[name] + gpu if name in self._gpu_load else gpu

    def _refit(self) -> None:
        assert self._window_sum is not None
        slots = np.asarray(self.fit(self._window_sum))
        if self._current_slots is not None:
            gpn = self.gpus_per_node or slots.shape[1]
            slots = align_gpus(self._current_slots, slots, self.num_experts, gpn)
            received = copies_received(self._current_slots, slots, self.num_experts)  # [G]
            self._moved.append(int(received.sum()))
            self._busiest.append(int(received.max()))
        share = gpu_share(slots, self.num_experts)
        self._shares.setdefault("fixed", share)
        self._shares["rebalanced"], self._current_slots = share, slots

    def _flush(self, names: tuple[str, ...]) -> None:
        if not self._block:
            return
        loads = np.stack(self._block)  # [B, L, E]
        for name in names:
            self._score(name, loads, self._shares[name])
        self._block = []

    def push_oracle(self, load: np.ndarray) -> None:
        """Second pass, for long intervals: the same steps again, each scored by its interval's oracle."""
        t = self._oracle_step
        self._oracle_step += 1
        if t < self.window:
            return
        j, k = divmod(t - self.window, self.every)
        if k == 0:
            self._flush(("oracle",))
            self._shares["oracle"] = gpu_share(np.asarray(self.fit(self._interval_sums[j])), self.num_experts)
        self._block.append(load)
        if len(self._block) >= self.BLOCK:
            self._flush(("oracle",))

    def finish(self, settings: dict[str, Any] | None = None) -> RebalanceResult:
        """The scores, after end_first_pass (and the second pass, if it was needed)."""
        self._flush(("oracle",))
        if self.needs_second_pass and self._oracle_step != self.steps:
            raise RuntimeError("finish() needs the same steps pushed to push() and push_oracle()")
        per_step: dict[str, np.ndarray] = {}
        peak_load: dict[str, float] = {}
        mean_load: dict[str, float] = {}
        sglang: dict[str, np.ndarray] = {}
        for name in SCHEDULES:
            peaks = np.concatenate(self._peaks[name])
            means = np.concatenate(self._means[name])
            per_step[name] = np.divide(peaks, means, out=np.ones_like(peaks), where=means > 0)
            peak_load[name], mean_load[name] = float(peaks.sum()), float(means.sum())
            sglang[name] = metrics.sglang_step_balancedness(np.concatenate(self._sglang[name]),
                                                            self._gpu_load[name].shape[0], self.dense_layers)
        return RebalanceResult(
            every=self.every,
            window=self.window,
            steps=self.steps,
            scored_steps=self.steps - self.window,
            rebalances=len(self._moved),
            per_step=per_step,
            peak_load=peak_load,
            mean_load=mean_load,
            sglang_per_step=sglang,
            gpu_load=self._gpu_load,
            expert_seconds=self._seconds,
            moved_copies=np.array(self._moved, dtype=np.int64),
            busiest_copies=np.array(self._busiest, dtype=np.int64),
            expert_bytes=self.expert_bytes,
            prices=self.prices,
            settings=dict(settings or {}),
        )

    def end_first_pass(self) -> None:
        self._flush(("fixed", "rebalanced"))
        self._close_interval()
        if self.steps <= self.window:
            raise InputError(
                f"--window {self.window}: the trace has only {self.steps} steps, none left to score after "
                "the window"
            )


def replay_rebalance(
    step_loads: Callable[[], Iterable[np.ndarray]],
    fit: FitFn,
    *,
    every: Sequence[int],
    window: int,
    num_experts: int,
    expert_bytes: int,
    gpus_per_node: int | None = None,
    settings: dict[str, Any] | None = None,
    buffer_steps: int | None = None,
    prices: RefitPrices | None = None,
    dense_layers: int = 0,
) -> list[RebalanceResult]:
    """Replay several rebalance intervals (one result per value of `every`) over the per-step loads.

    step_loads() must yield the same per-step loads [L, E] each time it is called: it is called a second time
    only when an interval is too long to hold in memory (RebalanceReplay.needs_second_pass).
    """
    replays = [RebalanceReplay(w, window, fit, num_experts, expert_bytes, gpus_per_node, buffer_steps, prices,
                               dense_layers) for w in every]
    for load in step_loads():
        for r in replays:
            r.push(load)
    for r in replays:
        r.end_first_pass()
    second = [r for r in replays if r.needs_second_pass]
    if second:
        for load in step_loads():
            for r in second:
                r.push_oracle(load)
    return [r.finish(settings) for r in replays]


