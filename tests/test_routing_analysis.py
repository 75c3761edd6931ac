"""Routing analysis metrics against values worked out by hand, and streaming invariants on random traces."""

from __future__ import annotations

import math

import numpy as np
import pytest
from report_fixtures import DECODE, PREFILL, random_ids, tiny_metadata, write_ids_trace

from simulator.routing_analysis import (
    RoutingAccumulator,
    analyze_routing,
    coselection_counts,
    gini,
    layer_expert_counts,
    load_entropy,
    shared_experts,
)
from simulator.routing_kernels import count_chunk, shared_sum
from traces import InputError, TraceChunk, open_trace

# Five tokens, two layers, four experts, top-2. Sequence 0 is tokens 0, 1, 3; sequence 1 is tokens 2, 4.
HAND_IDS = np.array([
    [[0, 1], [3, 2]],  # t0 seq0 pos0 prefill
    [[0, 2], [3, 1]],  # t1 seq0 pos1 prefill
    [[0, 1], [2, 3]],  # t2 seq1 pos0 prefill
    [[1, 2], [3, 0]],  # t3 seq0 pos2 decode
    [[0, 3], [2, 3]],  # t4 seq1 pos1 decode
])
HAND_SEQ = [0, 0, 1, 0, 1]
HAND_POS = [0, 1, 0, 2, 1]
HAND_PHASE = [PREFILL, PREFILL, PREFILL, DECODE, DECODE]


@pytest.fixture(params=[1, 2, 5], ids=lambda n: f"chunk{n}")
def hand(tmp_path, request):
    path = write_ids_trace(tmp_path / "hand.h5", HAND_IDS, num_experts=4, seq_id=np.asarray(HAND_SEQ),
                           position=np.asarray(HAND_POS), phase=np.asarray(HAND_PHASE))
    with open_trace(path) as trace:
        return analyze_routing(trace, segments=2, chunk_tokens=request.param)


def test_loads_entropy_gini_by_hand(hand):
    # layer 0: expert 0 in t0,t1,t2,t4; 1 in t0,t2,t3; 2 in t1,t3; 3 in t4. layer 1: 1, 1, 3, 5.
    assert hand.load.tolist() == [[4, 3, 2, 1], [1, 1, 3, 5]]
    expected_h0 = -sum(p * math.log2(p) for p in (0.4, 0.3, 0.2, 0.1))
    assert hand.entropy()[0] == pytest.approx(expected_h0)
    assert hand.normalized_entropy()[0] == pytest.approx(expected_h0 / 2)
    # Gini as mean absolute difference / (2 * mean): ordered pairs of (1,2,3,4) differ by 20 in total; 20 /
    # (2*16*2.5)
    assert hand.gini()[0] == pytest.approx(0.25)
    assert hand.max_over_mean().tolist() == pytest.approx([4 / 2.5, 5 / 2.5])
    assert hand.top_experts(2)[0] == [(0, pytest.approx(0.4)), (1, pytest.approx(0.3))]
    assert hand.top_experts(1)[1] == [(3, pytest.approx(0.5))]


def test_coselection_by_hand(hand):
    co = hand.coselection[0]
    assert co[0, 1] == co[1, 0] == 2  # t0, t2
    assert co[0, 2] == 1 and co[1, 2] == 1 and co[0, 3] == 1
    assert co[2, 3] == 0 and co[1, 3] == 0
    assert np.diag(co).tolist() == [4, 3, 2, 1]
    # 2 of expert 1's 3 tokens also chose 0
    assert hand.coselection_conditional(0)[1, 0] == pytest.approx(2 / 3)
    assert hand.coselection_lift(0)[0, 1] == pytest.approx(2 * 5 / (4 * 3))
    assert hand.top_pairs(0, 1) == [(0, 1, 2, pytest.approx(10 / 12))]
    # by lift: (1,2) 1*5/(3*2) = 0.83, (0,2) 1*5/(4*2) = 0.625, (0,3) 1*5/(4*1) = 1.25 is the most above
    # chance
    assert hand.top_pairs(0, 1, by="lift") == [(0, 3, 1, pytest.approx(1.25))]
    # only (0,1) has 2/5 tokens
    assert [p[:2] for p in hand.top_pairs(0, 3, by="lift", min_share=0.3)] == [(0, 1)]


def test_phases_by_hand(hand):
    cmp = hand.phase_comparison()
    assert (cmp["prefill_tokens"], cmp["decode_tokens"]) == (3, 2)
    assert hand.phase_load[PREFILL, 0].tolist() == [3, 2, 1, 0]
    assert hand.phase_load[DECODE, 0].tolist() == [1, 1, 1, 1]
    # |1/2-1/4| + |1/3-1/4| + |1/6-1/4| + |0-1/4| = 2/3, halved
    assert cmp["total_variation"][0] == pytest.approx(1 / 3)
    assert np.isnan(cmp["correlation"][0])  # decode load is flat: no correlation defined


def test_stability_by_hand(hand):
    st = hand.stability()
    # two segments of 5 tokens: [t0, t1, t2] and [t3, t4]; layer 1 loads (0,1,2,3) then (1,0,1,2)
    assert hand.segment_load[:, 1].tolist() == [[0, 1, 2, 3], [1, 0, 1, 2]]
    assert st["segment_correlation"][0, 1] == pytest.approx(np.corrcoef([0, 1, 2, 3], [1, 0, 1, 2])[0, 1])
    # consecutive pairs (t0,t1), (t1,t3), (t2,t4): layer 0 shares 1, 1, 1 experts; layer 1 shares 1, 1, 2
    assert st["consecutive_pairs"] == 3
    assert st["consecutive_overlap"].tolist() == pytest.approx([3 / 6, 4 / 6])
    # independent tokens: sum over experts of P(chosen)^2 = (16+9+4+1)/25, over K=2
    assert st["independent_overlap"][0] == pytest.approx(1.2 / 2)
    # top-2 of layer 0: segment 0 (3,2,1,0) -> {0,1}; segment 1 (1,1,1,1) -> {0,1} by stable order
    assert st["top_retained"][0] == pytest.approx(1.0)


def test_metric_extremes():
    assert load_entropy(np.array([5, 5, 5, 5])) == pytest.approx(2.0)
    assert load_entropy(np.array([0, 7, 0, 0])) == pytest.approx(0.0)
    assert gini(np.array([3, 3, 3])) == pytest.approx(0.0)
    assert gini(np.array([0, 0, 0, 9])) == pytest.approx(3 / 4)
    assert gini(np.zeros(4)) == 0.0


def test_random_trace_streaming_is_exact(tmp_path):
    rng = np.random.default_rng(7)
    ids = random_ids(rng, 3000, 3, 16, 4, skew=1.2)
    seq = rng.integers(0, 40, size=3000)
    pos = np.zeros(3000, np.int64)
    for s in range(40):  # positions count up within each sequence, sequences interleaved like batched decode
        where = np.flatnonzero(seq == s)
        pos[where] = np.arange(where.size)
    path = write_ids_trace(tmp_path / "r.h5", ids, num_experts=16, seq_id=seq, position=pos,
                           phase=(np.arange(3000) > 1000).astype(np.uint8))
    with open_trace(path) as trace:
        whole = analyze_routing(trace, segments=4, chunk_tokens=3000)
        small = analyze_routing(trace, segments=4, chunk_tokens=257)
    for name in ("phase_load", "segment_load", "coselection", "overlap_sum"):
        assert np.array_equal(getattr(whole, name), getattr(small, name)), name
    assert whole.overlap_pairs == small.overlap_pairs == 3000 - 40
    # co-selection against a one-hot product: X^T X counts tokens choosing both i and j
    onehot = np.zeros((3000, 16), np.int64)
    np.put_along_axis(onehot, ids[:, 1, :], 1, axis=1)
    assert np.array_equal(coselection_counts(ids, 16)[1], onehot.T @ onehot)
    # consecutive overlap against a direct loop over each sequence's tokens
    shared = 0
    for s in range(40):
        rows = ids[np.flatnonzero(seq == s), 2]
        shared += sum(len(set(a) & set(b)) for a, b in zip(rows[:-1], rows[1:], strict=True))
    assert whole.overlap_sum[2] == shared
    summary = whole.summary()
    assert summary["num_tokens"] == 3000 and len(summary["gini"]) == 3


@pytest.mark.parametrize("dtype", [np.uint8, np.uint16])
def test_kernels_match_numpy_reference(dtype):
    rng = np.random.default_rng(1)
    ids = random_ids(rng, 2000, 3, 40, 6, skew=1.0).astype(dtype)
    phase = rng.integers(0, 2, 2000).astype(np.uint8)
    segment = np.repeat(np.arange(5), 400)
    phase_load = np.zeros((2, 3, 40), np.int64)
    segment_load = np.zeros((5, 3, 40), np.int64)
    cosel = np.zeros((3, 40, 40), np.int64)
    count_chunk(ids, phase, segment, phase_load, segment_load, cosel)
    for p in (0, 1):
        assert np.array_equal(phase_load[p], layer_expert_counts(ids[phase == p], 40))
    for s in range(5):
        assert np.array_equal(segment_load[s], layer_expert_counts(ids[segment == s], 40))
    reference = coselection_counts(ids, 40)
    idx = np.arange(40)
    reference[:, idx, idx] = 0  # the kernel leaves the diagonal to the caller
    assert np.array_equal(cosel, reference)
    prev, cur = rng.integers(0, 2000, 500), rng.integers(0, 2000, 500)
    out = np.zeros(3, np.int64)
    shared_sum(ids, ids, prev, cur, 40, out)
    assert np.array_equal(out, shared_experts(ids[prev], ids[cur]).sum(axis=0))


def test_corrupt_ids_are_input_error():
    acc = RoutingAccumulator(tiny_metadata(1, 4, 2), 2)
    # expert 9 of 4: refused before the kernel indexes it
    with pytest.raises(InputError, match="out of range"):
        acc.add(TraceChunk(expert_ids=np.array([[[0, 9]]], np.uint8), phase=np.zeros(1, np.uint8)))


def test_empty_trace_is_input_error(tmp_path):
    path = write_ids_trace(tmp_path / "e.h5", np.zeros((0, 1, 2), np.int64), num_experts=4)
    with open_trace(path) as trace, pytest.raises(InputError, match="no tokens"):
        analyze_routing(trace)
