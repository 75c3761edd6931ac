"""placement.replica_counts_minmax, the replica split behind the replicated policies, checked by hand."""

from __future__ import annotations

import itertools

import numpy as np

from simulator.placement import replica_counts_minmax


def test_extra_slots_go_to_the_largest_load_per_replica():
    # loads 8, 4, 2, 1 with 3 extra slots: 8 -> 8/2 = 4; then 4 and 4 tie, the first (expert 0) -> 8/3 = 2.67;
    # then expert 1's 4 is largest -> 4/2 = 2; the largest load per replica is 8/3
    load = np.array([8.0, 4.0, 2.0, 1.0])
    counts = replica_counts_minmax(load, num_slots=7, max_per_expert=4)
    assert counts.tolist() == [3, 2, 1, 1]
    assert float((load / counts).max()) == 8 / 3
    # no other split of the 7 slots (at most 4 per expert) has a lower largest load per replica
    splits = [c for c in itertools.product(range(1, 5), repeat=4) if sum(c) == 7]
    assert min(float((load / np.array(c)).max()) for c in splits) == 8 / 3


def test_the_cap_per_expert_and_no_extra_slots():
    # expert 0 would take every extra slot, but at most 2 replicas fit (one per GPU): the rest go to the next
    counts = replica_counts_minmax(np.array([100.0, 1.0, 1.0]), num_slots=6, max_per_expert=2)
    assert counts.tolist() == [2, 2, 2]
    assert replica_counts_minmax(np.array([5.0, 1.0]), num_slots=2, max_per_expert=3).tolist() == [1, 1]
    # all-zero load: counts still sum to the slots
    assert replica_counts_minmax(np.zeros(4), num_slots=6, max_per_expert=2).sum() == 6
