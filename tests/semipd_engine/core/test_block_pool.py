from __future__ import annotations

import pytest

from semipd_engine.core.block_pool import BlockPool


def test_allocate_free_and_double_free():
    pool = BlockPool(8, 4)
    a = pool.try_allocate(3)
    assert pool.num_used == 3 and len(set(a)) == 3
    pool.free(a)
    assert pool.num_used == 0
    with pytest.raises(RuntimeError, match="freed twice"):
        pool.free(a[:1])
    assert pool.try_allocate(9) is None and pool.num_free == 8


def test_watermark_holds_back_admission_not_decodes():
    pool = BlockPool(10, 4, watermark=0.2)
    assert pool.try_allocate(9, admission=True) is None
    got = pool.try_allocate(8, admission=True)
    assert len(got) == 8
    assert pool.try_allocate(1, admission=True) is None  # only the reserve is left
    assert pool.try_allocate(2) is not None  # decodes may use the reserve


def test_blocks_needed_rounds_up_and_counts_what_is_held():
    pool = BlockPool(8, 4)
    assert pool.blocks_needed(1, 0) == 1 and pool.blocks_needed(4, 0) == 1 and pool.blocks_needed(5, 0) == 2
    assert pool.blocks_needed(5, 2) == 0


def test_ids_are_reused_lowest_first():
    pool = BlockPool(4, 2)
    a = pool.try_allocate(2)
    assert a == [0, 1]
    pool.free(a)
    assert sorted(pool.try_allocate(4)) == [0, 1, 2, 3]


@pytest.mark.parametrize("drop", ["retire", "release"])
def test_dropping_a_shared_or_repeated_block_as_sole_owner_raises_and_changes_nothing(drop):
    from semipd_engine.sim.simulator import make_request

    pool = BlockPool(8, 4, prefix_caching=True)
    a = pool.try_allocate(3)
    pool.try_allocate(0, hit=[(a[1], 123)])  # a second reference on a[1]
    req = make_request(0, 0.0, 12, 2)
    for bad in (a, [a[0], a[2], a[0]]):  # a shared block; a block listed twice
        before = (list(pool._ref), list(pool._free), pool.num_free)
        with pytest.raises(RuntimeError, match="shared or freed twice"):
            pool.retire(bad, 0) if drop == "retire" else pool.release(req, bad, 0)
        assert (list(pool._ref), list(pool._free), pool.num_free) == before


def test_allocating_a_referenced_free_block_is_caught():
    pool = BlockPool(4, 2)
    a = pool.try_allocate(1)
    pool._free.append(a[0])  # corrupted: a referenced block on the free list
    with pytest.raises(RuntimeError, match="allocator corrupted"):
        pool.try_allocate(1)
