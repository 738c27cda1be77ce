from __future__ import annotations

import pytest

from semipd_engine.kv_cache import BlockPool
from semipd_engine.request import Request, SamplingParams
from semipd_engine.scheduler import Scheduler


def test_pool_allocate_free_and_double_free():
    pool = BlockPool(8, 4)
    a = pool.allocate(3)
    assert pool.num_used == 3 and len(set(a)) == 3
    pool.free(a)
    assert pool.num_used == 0
    with pytest.raises(RuntimeError):
        pool.free(a[:1])
    with pytest.raises(MemoryError):
        pool.allocate(9)


def test_watermark_holds_back_admission_not_decodes():
    pool = BlockPool(10, 4, watermark=0.2)
    assert pool.can_allocate(8, admission=True) and not pool.can_allocate(9, admission=True)
    assert pool.can_allocate(10)


def _req(i, n):
    return Request(f"r{i}", list(range(1, n + 1)), SamplingParams(max_tokens=100))


def _simulate(sched, steps=500):
    """Drive the scheduler as the engine would, with a fake next token."""
    for _ in range(steps):
        batch = sched.schedule()
        if not batch:
            break
        for req, n in batch.items:
            req.num_computed_tokens += n
            if req.num_computed_tokens == req.num_tokens:
                req.output_token_ids.append(7)
                if len(req.output_token_ids) >= 20:
                    sched.finish(req)
        # blocks owned by live requests always equal the pool's count
        owned = sum(len(r.block_table) for r in list(sched.running) + list(sched.waiting))
        assert owned == sched.pool.num_used
        assert len(set(b for r in sched.running for b in r.block_table)) == owned


@pytest.mark.parametrize("policy", ["prefill_priority", "chunked"])
def test_preemption_under_pressure_loses_nothing(policy):
    pool = BlockPool(12, 4)
    sched = Scheduler(pool, policy, max_num_seqs=8, max_num_batched_tokens=16)
    reqs = [_req(i, 10) for i in range(6)]
    for r in reqs:
        sched.add(r)
    _simulate(sched)
    assert sched.num_preemptions > 0
    assert all(len(r.output_token_ids) == 20 for r in reqs)
    assert pool.num_used == 0 and not sched.has_work()


def test_chunked_policy_puts_decodes_first_within_budget():
    pool = BlockPool(64, 4)
    sched = Scheduler(pool, "chunked", max_num_seqs=8, max_num_batched_tokens=8)
    a = _req(0, 3)
    sched.add(a)
    batch = sched.schedule()
    a.num_computed_tokens += 3
    a.output_token_ids.append(7)
    sched.add(_req(1, 30))
    batch = sched.schedule()
    assert batch.items[0] == (a, 1)
    assert batch.num_tokens == 8  # 1 decode + a 7-token chunk of the long prompt
