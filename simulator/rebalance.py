"""Rebalance windows: how often should a deployment refit its expert placement?

Online expert-parallel servers (vLLM's and SGLang's EPLB) count expert load over a sliding window of recent forward
passes and periodically refit the placement. This module replays that on a trace: every W steps the placement is
refitted from the last N steps' load and then scored on the steps that follow, until the next refit. Two baselines
are scored on exactly the same steps:

- fixed: fitted once on the first N steps (the warm-up window, never scored) and kept for the whole trace;
- oracle: for each interval of W scored steps, fitted on those very steps (the best a refit could do, with
  hindsight).

The score of a step is its load imbalance: the sum over layers of the busiest GPU's load over the sum over layers of
the mean GPU load, with each expert's load split evenly among its replicas (as `placement.expected_gpu_load`). Each
refit after the first moves expert weights: its GPUs are first renumbered to keep as many experts in place as
possible (align_gpus), then every (GPU, expert) copy that the new placement has and the old one did not is one
expert's weights sent to that GPU (3 x hidden x expert FFN x 2 bytes for a SwiGLU expert in BF16,
the serving precision of the cost model).

Memory: the window (N steps) of per-step loads [L, E] int32, the open interval's steps while they fit in 64 MiB
(the oracle needs an interval's whole load before scoring its steps), an [L, E] sum per longer interval, whose steps
are then streamed a second time, and O(steps) floats of scores; never per-token data. Shape legend: L MoE layers, E experts, G GPUs, S slots per GPU, W interval
steps, N window steps.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from simulator.cost_model import expert_weight_bytes
from traces.errors import InputError
from traces.reader import DEFAULT_CHUNK_TOKENS, Trace
from traces.schema import PHASE_NAMES

SCHEDULES = ("fixed", "rebalanced", "oracle")
MAX_REFITS = 100  # default_intervals() keeps each schedule to this many refits
_PIECE_ENTRIES = 1 << 22  # bound on a per-step bincount's size: [steps in piece, L, E] counts
_PHASE_KEY = 1 << 40  # regrouped step keys: phase * _PHASE_KEY + index of the step within its phase


# ---------------------------------------------------------------------------------------------------------------
# Per-step loads, streamed
# ---------------------------------------------------------------------------------------------------------------


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
    each B consecutive tokens of one phase (as simulator.kernels.step_key): prefill and decode fill steps apart, as
    plan regroups them, so a phase switch does not cut a step short; a regrouped step is yielded when its phase's
    next step begins (or at the end), so steps come in the order they complete. phase ("prefill" / "decode")
    keeps only that phase's tokens ("all" or None: both). A step that spans chunk boundaries is yielded once, whole.
    """
    if tokens_per_step is not None and tokens_per_step < 1:
        raise InputError(f"--tokens-per-step must be at least 1, not {tokens_per_step}")
    meta = trace.metadata
    L, E = meta.num_moe_layers, meta.num_experts
    phase_code = _phase_code(phase)
    # open steps, possibly unfinished, by lane: one lane for recorded passes, one per phase for regrouped steps
    pending: dict[int, tuple[int, np.ndarray]] = {}
    kept = np.zeros(2, dtype=np.int64)  # tokens kept so far per phase (for tokens_per_step grouping)
    piece_tokens = max(1, _PIECE_ENTRIES // (L * E))
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
                lane = 0 if tokens_per_step is None else k // _PHASE_KEY
                if lane in pending and pending[lane][0] == k:
                    pending[lane][1][...] += load
                    continue
                if lane in pending:
                    yield pending.pop(lane)[1]
                pending[lane] = (k, load)
        if progress is not None:
            progress(n)
    yield from (load for _, load in pending.values())  # in the order they were opened


def _step_keys(step: np.ndarray, phases: np.ndarray, tokens_per_step: int | None, kept: np.ndarray) -> np.ndarray:
    """[T] key of each token's step (recorded: a step is a run of tokens with one key; regrouped: every token of a
    key, B per phase, however the phases interleave). kept: [2] tokens per phase
    before this chunk (updated). Regrouped steps count tokens per phase, as the replay kernels (kernels.step_key)."""
    if tokens_per_step is None:
        return step.astype(np.int64)
    keys = np.empty(step.shape[0], dtype=np.int64)
    for code in (0, 1):
        where = np.flatnonzero(phases == code)
        keys[where] = code * _PHASE_KEY + (kept[code] + np.arange(where.size)) // tokens_per_step
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
    """Split tokens into runs of equal key and count each run's load. ids: [T, L, K] -> [(load [L, E], key)]."""
    if ids.shape[0] == 0:
        return []
    _, L, _ = ids.shape
    new_run = np.empty(key.size, dtype=np.int64)
    new_run[0] = 0
    new_run[1:] = key[1:] != key[:-1]
    run = np.cumsum(new_run)  # [T] run index of each token
    runs = int(run[-1]) + 1
    flat = ((run[:, None, None] * L + np.arange(L)[None, :, None]) * num_experts + ids).ravel()
    counts = np.bincount(flat, minlength=runs * L * num_experts).astype(np.int32).reshape(runs, L, num_experts)
    firsts = np.flatnonzero(np.concatenate([[1], new_run[1:]]))
    # copies: a view would keep the whole [runs, L, E] buffer alive as long as any one step is held
    return [(counts[r].copy(), int(key[firsts[r]])) for r in range(runs)]


# ---------------------------------------------------------------------------------------------------------------
# Scoring helpers (pure)
# ---------------------------------------------------------------------------------------------------------------


def gpu_share(slots: np.ndarray, num_experts: int) -> np.ndarray:
    """[L, E, G] fraction of each expert's load that lands on each GPU (even split over replicas).

    slots: [L, G, S] expert id per slot (-1 empty).
    """
    L, G, S = slots.shape
    held = np.zeros((L, E := num_experts, G), dtype=np.float64)
    layer = np.broadcast_to(np.arange(L)[:, None, None], slots.shape)
    gpu = np.broadcast_to(np.arange(G)[None, :, None], slots.shape)
    used = slots >= 0
    np.add.at(held, (layer[used], slots[used], gpu[used]), 1.0)
    replicas = held.sum(axis=2, keepdims=True)  # [L, E, 1]
    return np.divide(held, replicas, out=np.zeros((L, E, G)), where=replicas > 0)


def step_peaks_means(loads: np.ndarray, share: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per step: sum over layers of the busiest GPU's load, and sum over layers of the mean GPU load.

    loads: [W, L, E]; share: [L, E, G]. Returns two [W] float64 arrays; their ratio is the step's imbalance.
    """
    gpu = np.matmul(loads.astype(np.float64).transpose(1, 0, 2), share)  # [L, W, G]
    return gpu.max(axis=2).sum(axis=0), gpu.mean(axis=2).sum(axis=0)


def presence(slots: np.ndarray, num_experts: int) -> np.ndarray:
    """[L, G, E] whether each GPU holds each expert. slots: [L, G, S]."""
    out = np.zeros((*slots.shape[:2], num_experts + 1), dtype=bool)  # last column collects empty slots
    np.put_along_axis(out, np.where(slots >= 0, slots, num_experts), True, axis=2)
    return out[..., :num_experts]


def copies_moved(old: np.ndarray, new: np.ndarray, num_experts: int) -> int:
    """(layer, GPU, expert) copies held by `new` but not by `old`: weights to send when switching. slots [L, G, S]."""
    return int((presence(new, num_experts) & ~presence(old, num_experts)).sum())


def align_gpus(old: np.ndarray, new: np.ndarray, num_experts: int, gpus_per_node: int) -> np.ndarray:
    """`new` with its GPUs renumbered to keep as many experts as possible where `old` has them.

    A policy refitted from scratch may put the same groups of experts on differently numbered GPUs; renumbering
    changes no GPU's load, only how many weights must move. Nodes are matched as wholes first, then GPUs inside each
    matched pair of nodes, so a placement's node grouping survives. Both matchings maximise shared experts
    (linear assignment). old, new: [L, G, S] -> [L, G, S].
    """
    from scipy.optimize import linear_sum_assignment

    L, G, _ = new.shape
    nodes = max(1, G // gpus_per_node) if G % gpus_per_node == 0 else 1
    gpn = G // nodes
    # [L, G old, G new] experts in common; float32 so that BLAS does it (exact: counts stay far below 2**24)
    shared = np.matmul(presence(old, num_experts).astype(np.float32),
                       presence(new, num_experts).astype(np.float32).transpose(0, 2, 1))
    out = np.empty_like(new)
    for layer in range(L):
        by_node = shared[layer].reshape(nodes, gpn, nodes, gpn).sum(axis=(1, 3))
        for n_old, n_new in zip(*linear_sum_assignment(by_node, maximize=True), strict=True):
            block = shared[layer, n_old * gpn:(n_old + 1) * gpn, n_new * gpn:(n_new + 1) * gpn]
            g_old, g_new = linear_sum_assignment(block, maximize=True)
            out[layer, n_old * gpn + g_old] = new[layer, n_new * gpn + g_new]
    return out


# ---------------------------------------------------------------------------------------------------------------
# The replay of one schedule
# ---------------------------------------------------------------------------------------------------------------

FitFn = Callable[[np.ndarray], np.ndarray]  # load [L, E] -> slots [L, G, S]


@dataclass
class RebalanceResult:
    """Scores of one (W, N) schedule. per_step: name -> [scored steps] imbalance (max/mean) of each step."""

    every: int
    window: int
    steps: int  # steps in the trace (after the phase filter)
    scored_steps: int  # steps after the warm-up window
    rebalances: int  # refits after the first fit (each may move weights)
    per_step: dict[str, np.ndarray]
    aggregate: dict[str, float]  # name -> sum over scored steps of peaks / sum of means
    moved_copies: np.ndarray  # [rebalances] expert copies sent to GPUs at each refit
    expert_bytes: int  # bytes of one expert's weights
    settings: dict[str, Any] = field(default_factory=dict)  # policy, GPUs, redundancy, phase, ...

    @property
    def moved_bytes(self) -> np.ndarray:
        """[rebalances] expert-weight bytes moved at each refit."""
        return self.moved_copies.astype(np.int64) * self.expert_bytes

    def mean_imbalance(self, name: str) -> float:
        values = self.per_step[name]
        return float(values.mean()) if values.size else float("nan")

    def percentile(self, name: str, q: float) -> float:
        values = self.per_step[name]
        return float(np.percentile(values, q)) if values.size else float("nan")

    def to_dict(self, series: bool = False) -> dict[str, Any]:
        """JSON-ready summary; series=True adds the per-step imbalance of each schedule."""
        moved = self.moved_bytes
        out: dict[str, Any] = {
            "every": self.every,
            "window": self.window,
            "steps": self.steps,
            "scored_steps": self.scored_steps,
            "rebalances": self.rebalances,
            "expert_bytes": self.expert_bytes,
            "moved_copies_per_rebalance": float(self.moved_copies.mean()) if self.rebalances else 0.0,
            "moved_bytes_per_rebalance": float(moved.mean()) if self.rebalances else 0.0,
            "moved_bytes_max": int(moved.max()) if self.rebalances else 0,
            "moved_bytes_total": int(moved.sum()),
            "settings": self.settings,
        }
        for name in SCHEDULES:
            out[name] = {
                "mean_imbalance": self.mean_imbalance(name),
                "p50": self.percentile(name, 50),
                "p95": self.percentile(name, 95),
                "p99": self.percentile(name, 99),
                "aggregate_imbalance": self.aggregate[name],
            }
            if series:
                out[name]["per_step"] = self.per_step[name].tolist()
        return out


class RebalanceReplay:
    """One (W, N) schedule over the per-step loads [L, E], pushed in order.

    Steps 0..N-1 are the warm-up window. At scored step t = N + j*W the rebalanced placement is refitted from steps
    [t-N, t); the fixed placement is the fit at j = 0; both are scored on every step as it comes (in small blocks).
    The oracle of an interval is fitted on the interval's own load, so its steps can only be scored once the
    interval is complete: intervals of up to `buffer_steps` steps are held and scored when they close; longer ones
    keep only their [L, E] sum, and their steps are scored in a second pass (push_oracle). Memory is thus the window,
    at most buffer_steps steps, and one sum per long interval.
    """

    BLOCK = 256  # steps scored together
    BUFFER_BYTES = 64 << 20  # steps of one interval held in memory for the oracle, at most this many bytes

    def __init__(self, every: int, window: int, fit: FitFn, num_experts: int, expert_bytes: int,
                 gpus_per_node: int | None = None, buffer_steps: int | None = None):
        if every < 1:
            raise InputError(f"--rebalance-every must be at least 1 step, not {every}")
        if window < 1:
            raise InputError(f"--window must be at least 1 step, not {window}")
        self.every, self.window, self.fit = every, window, fit
        self.num_experts, self.expert_bytes = num_experts, expert_bytes
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
        self._moved: list[int] = []
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
            peak, mean = step_peaks_means(np.stack(self._interval[start:start + self.BLOCK]), share)
            self._peaks["oracle"].append(peak)
            self._means["oracle"].append(mean)
        self._interval = []

    def _refit(self) -> None:
        assert self._window_sum is not None
        slots = np.asarray(self.fit(self._window_sum))
        if self._current_slots is not None:
            gpn = self.gpus_per_node or slots.shape[1]
            slots = align_gpus(self._current_slots, slots, self.num_experts, gpn)
            self._moved.append(copies_moved(self._current_slots, slots, self.num_experts))
        share = gpu_share(slots, self.num_experts)
        self._shares.setdefault("fixed", share)
        self._shares["rebalanced"], self._current_slots = share, slots

    def _flush(self, names: tuple[str, ...]) -> None:
        if not self._block:
            return
        loads = np.stack(self._block)  # [B, L, E]
        for name in names:
            peak, mean = step_peaks_means(loads, self._shares[name])
            self._peaks[name].append(peak)
            self._means[name].append(mean)
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
        aggregate: dict[str, float] = {}
        for name in SCHEDULES:
            peaks = np.concatenate(self._peaks[name])
            means = np.concatenate(self._means[name])
            per_step[name] = np.divide(peaks, means, out=np.ones_like(peaks), where=means > 0)
            aggregate[name] = float(peaks.sum() / means.sum()) if means.sum() > 0 else 1.0
        return RebalanceResult(
            every=self.every,
            window=self.window,
            steps=self.steps,
            scored_steps=self.steps - self.window,
            rebalances=len(self._moved),
            per_step=per_step,
            aggregate=aggregate,
            moved_copies=np.array(self._moved, dtype=np.int64),
            expert_bytes=self.expert_bytes,
            settings=dict(settings or {}),
        )

    def end_first_pass(self) -> None:
        self._flush(("fixed", "rebalanced"))
        self._close_interval()
        if self.steps <= self.window:
            raise InputError(
                f"--window {self.window}: the trace has only {self.steps} steps, none left to score after the window"
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
) -> list[RebalanceResult]:
    """Replay several rebalance intervals (one result per value of `every`) over the per-step loads.

    step_loads() must yield the same per-step loads [L, E] each time it is called: it is called a second time only
    when an interval is too long to hold in memory (RebalanceReplay.needs_second_pass).
    """
    replays = [RebalanceReplay(w, window, fit, num_experts, expert_bytes, gpus_per_node, buffer_steps)
               for w in every]
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


# ---------------------------------------------------------------------------------------------------------------
# On a trace
# ---------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RebalanceConfig:
    """What `moe-sim rebalance` and the report's rebalance section replay."""

    every: tuple[int, ...]  # W values: steps between refits
    window: int  # N: steps of load each refit looks at
    policy: str = "balanced"  # placement policy refitted each time (a load-only policy)
    num_gpus: int = 8
    gpus_per_node: int = 8
    redundant_experts: int = 0
    phase: str | None = None  # "prefill", "decode" or None for both
    tokens_per_step: int | None = None  # regroup tokens into steps of this size; None: recorded forward passes

    def __post_init__(self) -> None:
        if not self.every:
            raise InputError("--rebalance-every: give at least one interval")
        for w in self.every:
            if w < 1:
                raise InputError(f"--rebalance-every must be at least 1 step, not {w}")
        if self.window < 1:
            raise InputError(f"--window must be at least 1 step, not {self.window}")
        if self.policy.startswith("file:"):
            raise InputError("--placement: a fixed placement file cannot be refitted; choose a policy")

    def fit_function(self, num_experts: int) -> FitFn:
        """load [L, E] -> slots [L, G, S] with the configured policy.

        The first fit goes through placement.fit_placement, which validates the layout and the slots; refits call the
        policy's pure function from the POLICIES registry directly, skipping the per-fit validation of the Placement
        object (a Python loop per layer and GPU that would otherwise dominate a replay with thousands of refits). That
        is safe because every policy gives legal slots on any load, sparse or all-zero windows included (property
        test in tests/test_sim_placement.py).
        """
        from simulator.placement import NEEDS_COSELECTION, POLICIES, USES_REDUNDANCY, fit_placement

        if self.policy in NEEDS_COSELECTION:
            raise InputError(f"--placement {self.policy}: rebalancing refits from load alone; choose a load policy")
        try:
            fit_placement(self.policy, np.ones((1, num_experts)), num_gpus=self.num_gpus,
                          gpus_per_node=self.gpus_per_node, redundant_experts=self.redundant_experts)
        except InputError as exc:
            raise InputError(f"rebalance placement {self.policy!r} on {self.num_gpus} GPUs: {exc}") from exc
        policy = POLICIES[self.policy]
        redundant = self.redundant_experts if self.policy in USES_REDUNDANCY else 0

        def fit(load: np.ndarray) -> np.ndarray:
            return policy(np.asarray(load, dtype=np.float64), num_gpus=self.num_gpus,
                          gpus_per_node=self.gpus_per_node, redundant_experts=redundant)

        return fit

    def settings(self) -> dict[str, Any]:
        return {
            "policy": self.policy,
            "num_gpus": self.num_gpus,
            "gpus_per_node": self.gpus_per_node,
            "redundant_experts": self.redundant_experts,
            "phase": self.phase or "all",
            "tokens_per_step": self.tokens_per_step,
        }


def rebalance_trace(
    trace: Trace,
    config: RebalanceConfig,
    *,
    chunk_tokens: int = DEFAULT_CHUNK_TOKENS,
    progress: Callable[[int], None] | None = None,
) -> list[RebalanceResult]:
    """Replay every interval in config.every over the trace: one streamed pass, two when an interval is too long to
    hold its steps in memory (progress then counts both)."""
    meta = trace.metadata
    fit = config.fit_function(meta.num_experts)

    def loads() -> Iterator[np.ndarray]:
        return iter_step_loads(trace, phase=config.phase, tokens_per_step=config.tokens_per_step,
                               chunk_tokens=chunk_tokens, progress=progress)

    # weights move at the serving precision the cost model assumes (BF16), as the replay prices weight reads
    return replay_rebalance(loads, fit, every=config.every, window=config.window, num_experts=meta.num_experts,
                            expert_bytes=int(expert_weight_bytes(meta)), gpus_per_node=config.gpus_per_node,
                            settings=config.settings())


def passes_needed(every: Sequence[int], num_layers: int, num_experts: int) -> int:
    """Streamed passes rebalance_trace makes: 2 when some interval is too long to hold (for progress bars)."""
    step_bytes = num_layers * num_experts * np.dtype(np.int32).itemsize
    return 2 if max(every) > max(1, RebalanceReplay.BUFFER_BYTES // step_bytes) else 1


def default_window(steps: int) -> int:
    """Window N when none is given: an eighth of the trace's steps, at most 1000 (vLLM's EPLB window)."""
    return max(1, min(1000, steps // 8))


def default_intervals(steps: int, window: int) -> tuple[int, ...]:
    """Refit intervals worth comparing on a trace of `steps` steps: powers of ~3 from 1 up to the scored length."""
    scored = max(1, steps - window)
    candidates = [1, 3, 10, 30, 100, 300, 1000, 3000, 10000, 30000, 100000]
    # at most MAX_REFITS refits per interval keeps the sweep quick; an interval as long as the trace means "never"
    picked = tuple(w for w in candidates if w <= scored and scored / w <= MAX_REFITS)
    return picked or (scored,)
