"""The scheduling policies, driven as the engine core drives them, with a fake executor and clock."""

from __future__ import annotations

import pytest

from semipd_engine.core.block_pool import BlockPool
from semipd_engine.core.clock import VirtualClock
from semipd_engine.core.engine_core import EngineCore
from semipd_engine.core.policies import POLICIES, DecodeOnly, PrefillOnly
from semipd_engine.core.request import Request, SamplingParams, Timestamps
from semipd_engine.core.scheduler import ExecuteResult


class FakeExecutor:
    """Samples token 7 for every request that reached its end; each iteration takes `dt` seconds."""

    def __init__(self, clock: VirtualClock, dt: float = 0.01):
        self.clock, self.dt = clock, dt

    def execute(self, batch):
        self.clock.advance_to(self.clock.now() + self.dt)
        return ExecuteResult([(r, 7) for r, n in batch.items if r.num_computed_tokens + n == r.num_tokens], self.dt)


def _req(i, n, out=20):
    return Request(f"r{i}", list(range(1, n + 1)), SamplingParams(max_tokens=out, ignore_eos=True),
                   times=Timestamps(arrival=0.0))


def _core(policy, blocks, budget, seqs=8):
    clock = VirtualClock()
    sched = POLICIES.get(policy)(BlockPool(blocks, 4), seqs, budget, 1000)
    return EngineCore(sched, FakeExecutor(clock), clock)


@pytest.mark.parametrize("policy", ["prefill_priority", "chunked"])
def test_preemption_under_pressure_loses_nothing(policy):
    core = _core(policy, 12, 16)
    reqs = [_req(i, 10) for i in range(6)]
    for r in reqs:
        core.add_request(r)
    for _ in range(500):
        if not core.has_work():
            break
        core.step()
        s = core.scheduler
        owned = sum(len(r.block_table) for r in list(s.running) + list(s.waiting))
        assert owned == core.pool.num_used  # blocks held by live requests equal the pool's count
        assert len({b for r in s.running for b in r.block_table}) == owned
    assert core.scheduler.num_preemptions > 0
    assert all(len(r.output_token_ids) == 20 and r.finish_reason.value == "length" for r in reqs)
    assert core.pool.num_used == 0 and not core.has_work()
    # every token time comes from the injected clock: multiples of the fake iteration time
    assert all(abs(t / 0.01 - round(t / 0.01)) < 1e-6 for r in reqs for t in r.times.tokens)


def test_chunked_policy_puts_decodes_first_within_budget():
    core = _core("chunked", 64, 8)
    a = _req(0, 3)
    core.add_request(a)
    core.step()
    assert len(a.output_token_ids) == 1
    core.add_request(_req(1, 30))
    batch = core.scheduler.schedule(core.clock.now())
    assert batch.items[0] == (a, 1)
    assert batch.num_tokens == 8  # 1 decode + a 7-token chunk of the long prompt


def test_prefill_priority_runs_prompts_before_decodes():
    core = _core("prefill_priority", 64, 64)
    a = _req(0, 3)
    core.add_request(a)
    core.step()
    core.add_request(_req(1, 5))
    batch = core.scheduler.schedule(core.clock.now())
    assert [(r.request_id, n) for r, n in batch.items] == [("r1", 5)]


def test_prefill_only_hands_off_with_blocks_and_decode_only_evicts():
    pool = BlockPool(5, 4)
    pre, dec = PrefillOnly(pool, 8, 64, 1000), DecodeOnly(pool, 8, 64, 1000)
    a, b = _req(0, 8), _req(1, 8)
    for r in (a, b):
        pre.add(r)
    out = pre.update(batch := pre.schedule(0.0), ExecuteResult([(a, 7), (b, 7)], 0.1), 0.1)
    assert [r.request_id for r in out.handoffs] == ["r0", "r1"] and len(batch.items) == 2
    assert not pre.has_work() and pool.num_used == 4  # the blocks travel with the requests
    for r in out.handoffs:
        dec.adopt(r)
    # 9 tokens need a third block each: one is free, so the newest is preempted and leaves for recompute
    out = dec.update(batch := dec.schedule(0.2), ExecuteResult([(a, 7)], 0.01), 0.21)
    assert [r.request_id for r in out.evicted] == ["r1"] and b.num_computed_tokens == 0 and not b.block_table
    assert b.times.preemptions == [0.2]
    pre.add(b)
    pre.add(_req(2, 4))
    assert pre.waiting[0] is b, "a preempted request goes back to the front of the queue"


def test_abort_frees_blocks_in_every_state():
    core = _core("chunked", 16, 4)
    a, b = _req(0, 8), _req(1, 8)
    core.add_request(a)
    core.add_request(b)
    core.step()  # a is half prefilled, b waits
    assert core.pool.num_used > 0
    assert core.abort("r0") and core.abort("r1") and not core.abort("r0")
    assert core.pool.num_used == 0 and not core.has_work()
    assert a.finish_reason.value == "abort"


def test_unknown_policy_names_the_key():
    with pytest.raises(ValueError, match=r"engine\.policy.*chunked"):
        POLICIES.get("fifo")


def test_decode_only_runs_at_most_max_num_seqs_and_parks_the_rest():
    pool = BlockPool(64, 4)
    dec = DecodeOnly(pool, 2, 64, 1000)
    reqs = [_req(i, 4, out=3) for i in range(3)]
    for r in reqs:
        r.block_table = pool.try_allocate(2)
        r.output_token_ids, r.num_computed_tokens = [7], 4
        dec.adopt(r)
    assert dec.running == reqs[:2] and list(dec.parked) == reqs[2:]
    t = 0.0
    while dec.has_work():
        batch = dec.schedule(t)
        assert len(batch.items) <= 2
        dec.update(batch, ExecuteResult([(r, 7) for r, _ in batch.items], 0.01), t + 0.01)
        t += 0.01
    assert all(r.finish_reason.value == "length" for r in reqs) and pool.num_used == 0
    assert reqs[2].times.tokens[0] > reqs[0].times.tokens[-1] - 1e-9  # it waited for a slot
    assert dec.abort("r9") is False


def test_aborting_a_parked_request_frees_its_blocks():
    pool = BlockPool(64, 4)
    dec = DecodeOnly(pool, 1, 64, 1000)
    a, b = _req(0, 4), _req(1, 4)
    for r in (a, b):
        r.block_table = pool.try_allocate(2)
        r.output_token_ids, r.num_computed_tokens = [7], 4
        dec.adopt(r)
    assert list(dec.parked) == [b] and pool.num_used == 4
    assert dec.abort("r1") and not dec.parked and pool.num_used == 2 and dec.running == [a]


def _phase_split_run(prefill_cls, n_requests=40, every=2):
    """semi-PD's flow in process: a prefill and a decode worker over one small pool, arrivals faster than
    the pool drains. Returns the requests, the number of evictions, and how often a fresh request was
    admitted while a request evicted for recompute was left waiting (overtaken)."""
    clock = VirtualClock()
    pool = BlockPool(24, 4)
    pre = EngineCore(prefill_cls(pool, 8, 16, 1000), FakeExecutor(clock), clock)
    dec = EngineCore(DecodeOnly(pool, 8, 16, 1000), FakeExecutor(clock), clock)
    reqs = [_req(i, 8, out=24) for i in range(n_requests)]
    evictions = overtaken = 0
    for it in range(5000):
        if it % every == 0 and it // every < n_requests:
            pre.add_request(reqs[it // every])
        waiting = list(pre.scheduler.waiting)
        out = pre.step()
        still = set(map(id, pre.scheduler.waiting))
        fresh_admitted = any(id(r) not in still and not r.times.preemptions for r in waiting)
        evicted_left = any(id(r) in still and r.times.preemptions for r in waiting)
        overtaken += fresh_admitted and evicted_left
        for r in out.handoffs:
            dec.adopt(r)
        for r in dec.step().evicted:
            evictions += 1
            pre.scheduler.add(r)
        if it // every >= n_requests and not (pre.has_work() or dec.has_work()):
            break
    return reqs, evictions, overtaken


def test_preempted_requests_are_not_starved_under_memory_pressure():
    reqs, evictions, overtaken = _phase_split_run(PrefillOnly)
    assert evictions >= 5, "the scenario must put the pool under pressure"
    # every request completes: a recompute whose last chunk is one token used to look like a decode and
    # sit in the prefill worker forever, holding its blocks
    assert all(len(r.output_token_ids) == 24 for r in reqs)
    assert overtaken == 0, "a request evicted for recompute was overtaken by a newer one"
    e2e = {r.request_id: r.times.finished - r.times.arrival for r in reqs}
    preempted = [e2e[r.request_id] for r in reqs if r.times.preemptions]
    fresh = [e2e[r.request_id] for r in reqs if not r.times.preemptions]
    assert preempted and max(preempted) <= 2 * max(fresh)

    class BackOfTheQueue(PrefillOnly):  # the old behaviour, to show the check has teeth
        def add(self, req):
            super().add(req)
            if req.times.preemptions:
                self.waiting.remove(req)
                self.waiting.append(req)

    _, _, overtaken = _phase_split_run(BackOfTheQueue)
    assert overtaken > 0


@pytest.mark.parametrize("policy", ["prefill_priority", "chunked"])
def test_a_restored_scheduler_goes_on_as_the_original_would(policy):
    """A worker replaced mid-run (a new MPS share) hands its scheduler's state over: the successor, over the same
    pool, produces the same iterations as the original left alone, preemptions included."""
    import copy

    def run(split_at):
        core = _core(policy, 12, 16)
        reqs = [_req(i, 10) for i in range(6)]
        for r in reqs:
            core.add_request(r)
        log = []
        for step in range(500):
            if not core.has_work():
                break
            if step == split_at:  # the successor: a new scheduler on the same pool, from a pickled-like copy
                state = copy.deepcopy(core.scheduler.snapshot())
                succ = POLICIES.get(policy)(core.pool, 8, 16, 1000)
                succ.restore(state)
                reqs = {r.request_id: r for r in (*state.running, *state.waiting)} | {
                    r.request_id: r for r in reqs if r.finish_reason is not None}
                core.scheduler = succ
                reqs = [reqs[f"r{i}"] for i in range(6)]
            batch = core.scheduler.schedule(core.clock.now())
            log.append([(r.request_id, n) for r, n in batch.items])
            core.scheduler.update(batch, core.executor.execute(batch), core.clock.now())
        return log, core.scheduler.num_preemptions, [r.output_token_ids for r in reqs], core.pool.num_used

    straight = run(-1)
    assert straight[1] > 0  # the pool is small enough to preempt
    for split_at in (3, 9, 20):
        assert run(split_at) == straight
    with pytest.raises(ValueError, match="already holds"):
        core = _core(policy, 12, 16)
        core.add_request(_req(0, 4))
        core.scheduler.restore(core.scheduler.snapshot())


def test_running_stays_in_admission_order_and_any_request_leaves_it():
    """`running` is kept in `run_seq` order (a bisection finds the request to drop): requests leave from its
    middle and its ends, and the order holds for whoever joins after."""
    core = _core("prefill_priority", 200, 1000, seqs=6)
    sched = core.scheduler
    reqs = [_req(i, 4) for i in range(6)]
    for r in reqs:
        core.add_request(r)
    core.step()
    assert [r.run_seq for r in sched.running] == sorted(r.run_seq for r in sched.running) and len(sched.running) == 6
    for victim in (reqs[3], reqs[0], reqs[5]):
        assert sched.abort(victim.request_id) and victim not in sched.running
    assert sched.running == [reqs[1], reqs[2], reqs[4]]
    assert not sched._unrun(reqs[3])  # gone already: nothing else is taken out
    late = _req(9, 4)
    core.add_request(late)
    core.step()
    assert sched.running[-1] is late and [r.run_seq for r in sched.running] == sorted(r.run_seq for r in sched.running)
