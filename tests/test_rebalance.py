"""Rebalance windows: a hand-worked replay, streaming of per-step loads, and the real placement policies."""

from __future__ import annotations

import numpy as np
import pytest
from report_fixtures import DECODE, PREFILL, random_ids, write_ids_trace

from simulator.placement import Placement, expected_gpu_load, fit_placement
from simulator.rebalance import (
    RebalanceConfig,
    RebalanceResult,
    RefitPrices,
    advise,
    align_gpus,
    copies_moved,
    count_steps,
    default_intervals,
    default_window,
    gpu_share,
    iter_step_loads,
    rebalance_trace,
    replay_rebalance,
    score_steps,
    step_peaks_means,
)
from traces import InputError, open_trace


def pair_hot_with_cold(load: np.ndarray) -> np.ndarray:
    """Hand-checkable fit for 4 experts on 2 GPUs: GPU 0 gets the hottest and coldest, GPU 1 the middle
    two."""
    order = np.argsort(-load[0], kind="stable")
    return np.array([[[order[0], order[3]], [order[1], order[2]]]], dtype=np.int32)


# window N = 2 steps, refit every W = 2 steps; one layer, 4 experts, 2 GPUs
HAND_STEPS = [[3, 2, 1, 0], [3, 2, 1, 0], [0, 2, 2, 0], [0, 2, 2, 0], [0, 3, 0, 1], [0, 3, 0, 1]]


@pytest.mark.parametrize("buffer_steps", [None, 1], ids=["oracle-buffered", "oracle-second-pass"])
def test_hand_worked_rebalance(buffer_steps):
    loads = [np.array([row], dtype=np.int32) for row in HAND_STEPS]
    passes = []

    def stream():
        passes.append(1)
        return iter(loads)

    (result,) = replay_rebalance(stream, pair_hot_with_cold, every=[2], window=2, num_experts=4,
                                 expert_bytes=384, buffer_steps=buffer_steps)
    # intervals of 2 steps held unless the buffer is 1
    assert len(passes) == (1 if buffer_steps is None else 2)
    # Warm-up window (steps 0-1) load (6,4,2,0): GPU0 {0,3}, GPU1 {1,2}; this is the fixed placement and the
    # first fit. Steps 2-3 (0,2,2,0): fixed and rebalanced put 4 on GPU1, 0 on GPU0 -> 4/2 = 2. Oracle fitted
    # on (0,4,4,0):
    #   GPU0 {1,3}, GPU1 {2,0} -> 2 and 2 -> 1.
    # Refit at step 4 from steps 2-3 (0,4,4,0): GPU0 {1,3}, GPU1 {2,0}: GPU0 gains expert 1, GPU1 gains expert
    # 0
    #   -> 2 copies moved, 2 x 384 bytes.
    # Steps 4-5 (0,3,0,1): rebalanced GPU0 {1,3} = 4, GPU1 = 0 -> 2; fixed GPU0 {0,3} = 1, GPU1 {1,2} = 3 ->
    # 1.5;
    #   oracle on (0,6,0,2): order 1,3,0,2 -> GPU0 {1,2} = 3, GPU1 {3,0} = 1 -> 1.5.
    assert result.per_step["fixed"].tolist() == [2.0, 2.0, 1.5, 1.5]
    assert result.per_step["rebalanced"].tolist() == [2.0, 2.0, 2.0, 2.0]
    assert result.per_step["oracle"].tolist() == [1.0, 1.0, 1.5, 1.5]
    assert (result.steps, result.scored_steps, result.rebalances) == (6, 4, 1)
    assert result.moved_copies.tolist() == [2]
    assert result.moved_bytes.tolist() == [768]
    # step imbalance: busiest GPU per step summed over the scored steps, over the summed mean (2 per step)
    assert result.step_imbalance("fixed") == pytest.approx((4 + 4 + 3 + 3) / 8)
    assert result.step_imbalance("rebalanced") == pytest.approx((4 + 4 + 4 + 4) / 8)
    assert result.step_imbalance("oracle") == pytest.approx((2 + 2 + 3 + 3) / 8)
    # aggregate: GPU totals over the scored steps. fixed GPU0 0+0+1+1 = 2, GPU1 4+4+3+3 = 14 -> 14/8;
    # rebalanced GPU0 0+0+4+4 = 8, GPU1 4+4+0+0 = 8 -> 1.0 (balanced on the whole, never within a step);
    # oracle 4+6 vs 4+2
    assert result.aggregate_imbalance("fixed") == pytest.approx(14 / 8)
    assert result.aggregate_imbalance("rebalanced") == pytest.approx(1.0)
    assert result.aggregate_imbalance("oracle") == pytest.approx(10 / 8)
    summary = result.to_dict()
    assert summary["rebalanced"]["step_imbalance"] == 2.0 and summary["fixed"]["aggregate_imbalance"] == 1.75
    assert summary["moved_bytes_per_rebalance"] == 768.0


def test_weight_moves_cost_time_and_the_advice_can_say_dont():
    loads = [np.array([row], dtype=np.int32) for row in HAND_STEPS]
    # 1 s per assignment, 0.5 s per expert with work; 384-byte experts over 384 B/s: the refit sends one copy
    # to each GPU, so the busiest receiver takes 1 s
    prices = RefitPrices("slow", scale_up_bandwidth=384.0, seconds_per_assignment=1.0,
                         seconds_per_expert_read=0.5)
    (result,) = replay_rebalance(lambda: iter(loads), pair_hot_with_cold, every=[2], window=2, num_experts=4,
                                 expert_bytes=384, prices=prices)
    assert result.busiest_copies.tolist() == [1] and result.move_seconds.tolist() == [1.0]
    # expert time per step = the slowest GPU's max(load x 1 s, experts with work x 0.5 s) (one layer):
    # fixed: steps 2-3 GPU1 {1,2} load 4 -> 4 s; steps 4-5 GPU1 load 3 -> 3 s: (4 + 4 + 3 + 3) / 4 steps
    assert result.seconds_per_step("fixed") == pytest.approx(14 / 4)
    # rebalanced: 4 s every step, plus the 1 s move spread over 4 steps
    assert result.seconds_per_step("rebalanced") == pytest.approx(4.0)
    assert result.seconds_with_moves() == pytest.approx(4.25)
    assert result.gain() == pytest.approx(1 - 4.25 / 3.5)
    advice = advise([result])
    assert advice.every is None and advice.reason.startswith("keep the fixed placement: no interval is "
                                                             "shorter")
    assert result.to_dict()["seconds_per_step_with_moves"] == pytest.approx(4.25)


def test_weight_reads_can_set_the_step_time():
    # a GPU holding two experts with work but little load: reads (2 x 10 s) outweigh compute (2 x 1 s)
    loads = np.array([[[1, 1, 0, 0]]], dtype=np.int32)  # [W=1, L=1, E=4]
    share = gpu_share(np.array([[[0, 1], [2, 3]]]), 4)
    _, _, gpu, seconds, _ = score_steps(loads, share, seconds_per_assignment=1.0,
                                        seconds_per_expert_read=10.0)
    assert gpu.tolist() == [[2.0, 0.0]] and seconds.tolist() == [20.0]


def _scored(every: int, rebalanced: float, seconds_per_refit: float, fixed: float = 2.0) -> RebalanceResult:
    """A result over 100 scored steps: expert seconds per step as given, one copy per refit to the busiest GPU
    at 1000 B/s."""
    seconds = {"fixed": 100 * fixed, "rebalanced": 100 * rebalanced, "oracle": 100.0}
    return RebalanceResult(
        every=every, window=10, steps=110, scored_steps=100, rebalances=100 // every,
        per_step={k: np.full(100, v / 100) for k, v in seconds.items()}, peak_load=seconds,
        mean_load=dict.fromkeys(seconds, 100.0), gpu_load={k: np.ones((1, 2)) for k in seconds},
        expert_seconds=seconds, moved_copies=np.ones(100 // every, dtype=np.int64),
        busiest_copies=np.ones(100 // every, dtype=np.int64), expert_bytes=int(1000 * seconds_per_refit),
        prices=RefitPrices("x", 1000.0, 1.0, 0.0),
    )


def test_advice_needs_the_margin_with_moves_counted():
    # every 10: 1.90 s + 10 refits x 1 s over 100 steps -> 2.00 s: no gain
    # every 50: 1.95 s + 2 refits x 1 s -> 1.97 s, 1.5% shorter than 2.0 s: under the 2% margin
    results = [_scored(10, 1.90, 1.0), _scored(50, 1.95, 1.0)]
    assert results[0].seconds_with_moves() == pytest.approx(2.0)
    assert results[1].seconds_with_moves() == pytest.approx(1.97)
    assert (advise(results).every is None
            and "only 1.5% shorter, under the 2% margin" in advise(results).reason)
    advice = advise(results, margin=0.01)  # 1.5% clears a 1% margin
    assert advice.every == 50 and advice.reason.startswith("refit every 50 steps: 1.5% shorter steps")
    assert advise([_scored(10, 1.5, 0.0)]).every == 10  # free moves and a large gain


def test_partial_last_interval_and_every_one():
    loads = [np.array([row], dtype=np.int32) for row in HAND_STEPS[:5]]
    every1, every2 = replay_rebalance(lambda: iter(loads), pair_hot_with_cold, every=[1, 2], window=2,
                                      num_experts=4, expert_bytes=1)
    # W = 1: the oracle is fitted on each step alone, and the refit at step t uses steps t-2, t-1.
    assert every1.rebalances == 2  # refits at steps 3 and 4 (step 2's refit is the first fit)
    assert every1.per_step["oracle"].tolist() == [1.0, 1.0, 1.5]
    # W = 2: steps 2-3 then a partial interval of step 4 alone
    assert every2.per_step["oracle"].tolist() == [1.0, 1.0, 1.5]
    assert every2.scored_steps == 3


def test_refit_renumbers_gpus_to_move_less():
    # the refit yields the same two groups on swapped GPUs: renumbering keeps every expert in place
    old = np.array([[[0, 1], [2, 3]]], dtype=np.int32)
    new = np.array([[[2, 3], [1, 0]]], dtype=np.int32)
    assert copies_moved(old, new, 4) == 4
    assert copies_moved(old, align_gpus(old, new, 4, gpus_per_node=2), 4) == 0
    # two nodes of two GPUs: node groups {0,1,2,3} | {4,5,6,7} come back on swapped nodes, GPUs inside swapped
    # too
    old = np.array([[[0, 1], [2, 3], [4, 5], [6, 7]]], dtype=np.int32)
    new = np.array([[[6, 7], [4, 5], [2, 3], [1, 0]]], dtype=np.int32)
    aligned = align_gpus(old, new, 8, gpus_per_node=2)
    assert copies_moved(old, aligned, 8) == 0
    assert sorted(aligned[0, 0].tolist()) == [0, 1]
    # in a replay, a fit that numbers GPUs the other way round each time moves nothing when the groups stay
    loads = [np.array([row], dtype=np.int32) for row in ([3, 2, 1, 0],) * 2 + ([2, 3, 0, 1],) * 4]

    def swap_fit(load: np.ndarray) -> np.ndarray:  # renumbered GPUs each time: alignment must undo it
        return pair_hot_with_cold(load)[:, ::-1]

    (result,) = replay_rebalance(lambda: iter(loads), swap_fit, every=[2], window=2, num_experts=4,
                                 expert_bytes=1)
    # window (6,4,2,0): {0,3} | {1,2} (reversed); refit at 4 from (4,6,0,2): {1,2} | {0,3} -> same groups,
    # renumbered
    assert result.moved_copies.tolist() == [0]


def test_window_longer_than_trace_is_input_error():
    loads = [np.array([row], dtype=np.int32) for row in HAND_STEPS[:2]]
    with pytest.raises(InputError, match="--window 2"):
        replay_rebalance(lambda: iter(loads), pair_hot_with_cold, every=[1], window=2, num_experts=4,
                         expert_bytes=1)
    with pytest.raises(InputError, match="--rebalance-every"):
        RebalanceConfig(every=(0,), window=3)


def test_scoring_helpers_match_placement_module():
    rng = np.random.default_rng(3)
    load = rng.integers(0, 100, size=(3, 16)).astype(np.float64)
    placement = fit_placement("replicated", load, num_gpus=4, gpus_per_node=2, redundant_experts=4)
    share = gpu_share(placement.slots, 16)
    assert np.allclose(np.einsum("le,leg->lg", load, share), expected_gpu_load(placement, load))
    peaks, means = step_peaks_means(load[None], share)
    gpu = expected_gpu_load(placement, load)
    assert (peaks[0] == pytest.approx(gpu.max(axis=1).sum())
            and means[0] == pytest.approx(gpu.mean(axis=1).sum()))
    # moving: identical placements move nothing; swapping two experts between GPUs moves two copies per layer
    assert copies_moved(placement.slots, placement.slots, 16) == 0
    swapped = Placement("x", np.array([[[0, 1], [2, 3]]]), 4, 2).slots
    other = np.array([[[2, 1], [0, 3]]], dtype=np.int32)
    assert copies_moved(swapped, other, 4) == 2
    assert copies_moved(np.array([[[0, -1], [1, 2]]]), np.array([[[0, 1], [1, 2]]]), 3) == 1


def test_step_loads_stream_across_chunks(tmp_path):
    rng = np.random.default_rng(5)
    ids = random_ids(rng, 600, 2, 8, 2)
    step = np.repeat(np.arange(60), 10)
    phase = np.where(step < 20, PREFILL, DECODE)
    path = write_ids_trace(tmp_path / "s.h5", ids, num_experts=8, step=step, phase=phase)

    def reference(rows: np.ndarray) -> np.ndarray:
        out = np.zeros((2, 8), np.int64)
        for layer in range(2):
            out[layer] = np.bincount(rows[:, layer].ravel(), minlength=8)
        return out

    with open_trace(path) as trace:
        for chunk in (600, 7, 64):
            got = list(iter_step_loads(trace, chunk_tokens=chunk))
            assert len(got) == 60
            assert all(np.array_equal(g, reference(ids[step == s])) for s, g in enumerate(got))
        decode = list(iter_step_loads(trace, phase="decode", chunk_tokens=33))
        assert len(decode) == 40 and np.array_equal(decode[0], reference(ids[step == 20]))
        regrouped = list(iter_step_loads(trace, tokens_per_step=25, chunk_tokens=64))
        assert len(regrouped) == 24 and np.array_equal(regrouped[1], reference(ids[25:50]))
        with pytest.raises(InputError, match="--phase"):
            list(iter_step_loads(trace, phase="both"))


def test_rebalance_trace_with_real_policy(tmp_path):
    rng = np.random.default_rng(11)
    # popularity drifts: the first half favours one set of experts, the second half another
    ids = np.concatenate([random_ids(rng, 2000, 2, 16, 2, skew=1.5),
                          random_ids(rng, 2000, 2, 16, 2, skew=1.5)])
    step = np.arange(4000) // 100
    path = write_ids_trace(tmp_path / "d.h5", ids, num_experts=16, step=step)
    config = RebalanceConfig(every=(2, 30), window=4, policy="balanced", num_gpus=4, gpus_per_node=4)
    with open_trace(path) as trace:
        fast, slow = rebalance_trace(trace, config, chunk_tokens=512)
        loads = list(iter_step_loads(trace))
    # the same replay with the oracle's intervals scored in a second pass gives the same numbers
    fit_function = config.fit_function(16)
    again = replay_rebalance(lambda: iter(loads), fit_function, every=[2, 30], window=4, num_experts=16,
                             expert_bytes=1, gpus_per_node=4, buffer_steps=1)
    for one, two in zip((fast, slow), again, strict=True):
        for name in ("fixed", "rebalanced", "oracle"):
            assert np.array_equal(one.per_step[name], two.per_step[name]), name
    assert (fast.steps, fast.scored_steps, fast.rebalances) == (40, 36, 17)
    assert (slow.scored_steps, slow.rebalances) == (36, 1)

    def fit(load: np.ndarray) -> Placement:
        return fit_placement("balanced", load, num_gpus=4, gpus_per_node=4)

    def imbalance(placement: Placement, load: np.ndarray) -> float:
        gpu = expected_gpu_load(placement, load)
        return float(gpu.max(axis=1).sum() / gpu.mean(axis=1).sum())

    step_loads = np.stack([[np.bincount(ids[step == s, layer].ravel(), minlength=16) for layer in range(2)]
                           for s in range(40)])  # [steps, L, E]
    fixed = fit(step_loads[:4].sum(axis=0))
    assert fast.per_step["fixed"] == pytest.approx([imbalance(fixed, step_loads[s]) for s in range(4, 40)])
    oracle = []
    for start in range(4, 40, 2):  # W = 2: oracle fitted on each pair of scored steps
        placement = fit(step_loads[start:start + 2].sum(axis=0))
        oracle += [imbalance(placement, step_loads[s]) for s in range(start, start + 2)]
    assert fast.per_step["oracle"] == pytest.approx(oracle)
    rebalanced = [imbalance(fit(step_loads[t - 4:t].sum(axis=0)), step_loads[t + d])
                  for t in range(4, 40, 2) for d in range(2)]
    assert fast.per_step["rebalanced"] == pytest.approx(rebalanced)
    # after the popularity shift, refitting often beats the placement fitted on the first window
    assert fast.step_imbalance("rebalanced") < fast.step_imbalance("fixed")
    assert fast.moved_copies.sum() > 0 and fast.settings["policy"] == "balanced"
    assert fast.expert_bytes == 3 * 8 * 4 * 2  # SwiGLU, hidden 8, expert FFN 4, BF16 serving weights


def test_config_defaults_come_from_the_trace(tmp_path):
    rng = np.random.default_rng(5)
    step = np.arange(4000) // 10  # 400 recorded steps
    path = write_ids_trace(tmp_path / "s.h5", random_ids(rng, 4000, 1, 8, 2), num_experts=8, step=step)
    with open_trace(path) as trace:
        resolved = RebalanceConfig(num_gpus=2, gpus_per_node=2).resolve(trace)
        assert resolved.window == default_window(400) == 50
        assert resolved.every == default_intervals(400, 50) == (10, 30, 100, 300)
        kept = RebalanceConfig(every=(7,), num_gpus=2, gpus_per_node=2).resolve(trace)
        assert kept.every == (7,) and kept.window == 50
        (result,) = rebalance_trace(trace, RebalanceConfig(every=(100,), num_gpus=2, gpus_per_node=2))
    assert result.window == 50 and result.settings["hardware"] == "h100"
    with pytest.raises(InputError, match="not divisible into nodes"):
        RebalanceConfig(num_gpus=6, gpus_per_node=4)


def test_count_steps_matches_stream(tmp_path):
    rng = np.random.default_rng(2)
    ids = random_ids(rng, 500, 1, 8, 2)
    step = np.repeat(np.arange(50), 10)
    phase = np.tile(np.r_[np.zeros(6), np.ones(4)], 50)  # prefill and decode tokens in every step
    path = write_ids_trace(tmp_path / "c.h5", ids, num_experts=8, step=step, phase=phase)
    with open_trace(path) as trace:
        for kwargs in ({}, {"phase": "decode"}, {"tokens_per_step": 7},
                       {"tokens_per_step": 7, "phase": "all"}):
            want = len(list(iter_step_loads(trace, chunk_tokens=64, **kwargs)))
            assert count_steps(trace, chunk_tokens=33, **kwargs) == want, kwargs
        assert count_steps(trace) == 50


@pytest.mark.parametrize("policy", ["replicated", "replicated-hier"])
def test_refits_on_sparse_windows_give_valid_placements(policy):
    # Refits skip Placement's validation, so they rely on every policy giving legal slots; a short window
    # often sees only a few experts (once: "GPU 5 holds the same expert twice" from replicated on such a
    # load).
    from simulator.placement import check_slots

    config = RebalanceConfig(every=(1,), window=1, policy=policy, num_gpus=8, gpus_per_node=4,
                             redundant_experts=16)
    fit = config.fit_function(64)
    rng = np.random.default_rng(5)
    loads = [np.zeros((3, 64))]
    sparse = np.zeros((3, 64))
    for e, v in {11: 16, 18: 7, 26: 8, 30: 11, 37: 8, 42: 6, 51: 9, 52: 5, 56: 19}.items():
        sparse[:, e] = v
    loads.append(sparse)
    for _ in range(6):
        load = np.zeros((3, 64))
        load[:, rng.choice(64, size=5, replace=False)] = rng.integers(1, 40, size=5)
        loads.append(load)
    for load in loads:
        slots = fit(load)
        check_slots(slots, 64, policy)
        assert slots.shape == (3, 8, 10)


def test_replay_and_rebalance_mean_the_same_step_imbalance(tmp_path):
    """One definition everywhere: a load-blind placement scored on the same steps gives the same figure in
    both."""
    from simulator.replay import ReplayConfig, replay

    rng = np.random.default_rng(3)
    ids = random_ids(rng, 3000, 2, 16, 2, skew=1.3)
    step = np.arange(3000) // 50  # 60 steps of 50 tokens; the first quarter is 15 whole steps
    path = write_ids_trace(tmp_path / "same.h5", ids, num_experts=16, step=step)
    with open_trace(path) as trace:
        replayed = replay(trace, ReplayConfig(num_gpus=4, gpus_per_node=4, placements=("contiguous",),
                                              fit_fraction=0.25)).placements[0]
        (refits,) = rebalance_trace(trace, RebalanceConfig(every=(45,), window=15, policy="contiguous",
                                                           num_gpus=4, gpus_per_node=4))
    assert replayed.steps == refits.scored_steps == 45
    assert replayed.step_imbalance == pytest.approx(refits.step_imbalance("fixed"), rel=1e-12)
    assert replayed.aggregate_imbalance == pytest.approx(refits.aggregate_imbalance("fixed"), rel=1e-12)
    assert replayed.step_imbalance_percentiles["p95"] == pytest.approx(refits.percentile("fixed", 95),
                                                                       rel=1e-12)
    # and the engines' balancedness, from each one's own per-step loads
    assert replayed.sglang_balancedness == pytest.approx(refits.sglang_balancedness("fixed"), rel=1e-12)
    assert replayed.vllm_balancedness == pytest.approx(refits.vllm_balancedness("fixed"), rel=1e-12)
