"""Compute shares as core sets and thread pools: overlapping shares never run more threads than cores."""

from __future__ import annotations

import itertools

import pytest

from semipd_engine.shares.partition import Partition, core_sets, pinned_sets, thread_counts


@pytest.mark.parametrize("n", [1, 2, 3, 4, 8, 16, 64])
def test_thread_pools_never_outnumber_the_cores(n):
    cores = tuple(range(n))
    for x, y in itertools.product(range(1, 101), repeat=2):
        p = Partition(x, y)
        pre, dec = core_sets(p, cores)
        tp, td = thread_counts(p, cores)
        assert 1 <= tp <= len(pre) and 1 <= td <= len(dec)
        union = len(set(pre) | set(dec))
        assert tp + td <= max(union, 2), (n, x, y, tp, td)
        if len(pre) + len(dec) <= union:  # disjoint: one thread per core
            assert (tp, td) == (len(pre), len(dec))


def test_overlap_divides_the_shared_cores_like_mps_divides_sms():
    two = (0, 1)
    assert thread_counts(Partition(50, 50), two) == (1, 1)
    assert thread_counts(Partition(100, 100), two) == (1, 1)  # not 2 + 2 on 2 cores
    assert thread_counts(Partition(100, 50), two) == (1, 1)
    sixteen = tuple(range(16))
    assert thread_counts(Partition(100, 100), sixteen) == (8, 8)
    assert thread_counts(Partition(100, 50), sixteen) == (11, 5)  # caps 16 and 8 cores, scaled by 16 / 24
    assert thread_counts(Partition(50, 50), sixteen) == (8, 8)


@pytest.mark.parametrize("n", [1, 2, 3, 8, 16])
def test_overlapping_caps_run_on_disjoint_parts_of_their_cores(n):
    cores = tuple(range(n))
    for x, y in itertools.product(range(1, 101, 3), repeat=2):
        p = Partition(x, y)
        caps = core_sets(p, cores)
        parts = pinned_sets(p, cores)
        assert (len(parts[0]), len(parts[1])) == thread_counts(p, cores)  # one thread per core it runs on
        assert set(parts[0]) <= set(caps[0]) | set(caps[1]) and set(parts[1]) <= set(caps[0]) | set(caps[1])
        if n > 1:
            assert not set(parts[0]) & set(parts[1])
        if len(caps[0]) + len(caps[1]) <= n:
            assert parts == caps  # disjoint caps are used as they are


def test_two_cores_run_every_overlap_as_one_core_each():
    for x, y in [(100, 100), (100, 50), (50, 100), (60, 70)]:
        assert pinned_sets(Partition(x, y), (0, 1)) == ((0,), (1,))
    assert pinned_sets(Partition(100, 50), tuple(range(16))) == (tuple(range(11)), tuple(range(11, 16)))
