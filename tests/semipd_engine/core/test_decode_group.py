"""The decode group: a scheduler keeping its decodes as one group computes what the per-request loops compute."""

from __future__ import annotations

import numpy as np
import pytest

from semipd_engine.core.block_pool import BlockPool
from semipd_engine.core.policies import make_scheduler
from semipd_engine.core.request import FinishReason, Request, SamplingParams, Timestamps
from semipd_engine.core.scheduler import ExecuteResult


class _Engine:
    max_num_seqs, max_num_batched_tokens = 24, 256


def _requests(n=60, seed=0, ignore_eos=True, shared=True):
    rng = np.random.default_rng(seed)
    system = list(range(500, 548))
    out = []
    for i in range(n):
        own = [int(x) for x in rng.integers(0, 400, int(rng.integers(3, 90)))]
        prompt = (system[: int(rng.integers(0, 49))] if shared else []) + own
        out.append(Request(f"r{i}", prompt, SamplingParams(max_tokens=int(rng.integers(1, 70)), ignore_eos=ignore_eos),
                           times=Timestamps(arrival=float(i) * 0.7)))
    return out


def _drive(policy, reqs, group, num_blocks=60, abort_at=None):
    """The simulator's loop in miniature: iteration i ends at a time set by its size, every token is 0."""
    sched = make_scheduler(policy, BlockPool(num_blocks, 4, 0.05, prefix_caching=True), _Engine, 200)
    sched.emit_outputs = False
    if group:
        sched.enable_decode_group(0)
    todo, t, it = list(reqs), 0.0, 0
    while todo or sched.has_work():
        while todo and todo[0].times.arrival <= t:
            sched.add(todo.pop(0))
        batch = sched.schedule(t)
        if not batch:
            t = todo[0].times.arrival
            continue
        sampled = [(r, 0) for r, n in batch.items if r.num_computed_tokens + n == r.num_tokens]
        t += 0.25 + 0.001 * batch.num_tokens
        sched.update(batch, ExecuteResult(sampled, 0.0), t)
        it += 1
        if it == abort_at:  # the oldest decoding request (a member, with the group)
            victim = next(r for r in sched.running if r.output_token_ids)
            assert sched.abort(victim.request_id)
    return sched, {r.request_id: (r.finish_reason, len(r.output_token_ids), tuple(r.times.tokens), r.times.finished,
                                  tuple(r.times.preemptions), r.num_cached_tokens, r.num_computed_tokens)
                   for r in reqs}


@pytest.mark.parametrize("policy", ["prefill_priority", "chunked"])
@pytest.mark.parametrize("num_blocks", [60, 400])
def test_the_group_gives_every_token_time_the_per_request_loop_gives(policy, num_blocks):
    """A pool small enough to preempt (60 blocks) and one that is not; prompts sharing a prefix: the same
    preemptions, cache hits and token times either way."""
    ref_sched, ref = _drive(policy, _requests(), group=False, num_blocks=num_blocks)
    sched, got = _drive(policy, _requests(), group=True, num_blocks=num_blocks)
    assert got == ref
    assert (sched.prefix_hits, sched.num_preemptions) == (ref_sched.prefix_hits, ref_sched.num_preemptions)
    assert sched.prefix_hits > 0 and (num_blocks > 60 or sched.num_preemptions > 0)
    assert sched.pool.num_used == 0 and sched.group.n == 0  # drained: no member, no referenced block


def test_a_request_the_group_cannot_take_dissolves_it_and_the_loop_takes_over():
    """Without ignore_eos a request's last token is not known in advance: the group hands every member back."""
    reqs = _requests(30, seed=2, ignore_eos=False)
    _, ref = _drive("chunked", reqs, group=False)
    sched, got = _drive("chunked", _requests(30, seed=2, ignore_eos=False), group=True)
    assert got == ref and sched.group.n == 0


def test_an_aborted_member_leaves_with_the_tokens_it_had():
    _, ref = _drive("chunked", _requests(20, seed=3), group=False, num_blocks=400, abort_at=40)
    _, got = _drive("chunked", _requests(20, seed=3), group=True, num_blocks=400, abort_at=40)
    aborted = [v for v in got.values() if v[0] is FinishReason.ABORT]
    assert got == ref and len(aborted) == 1 and aborted[0][1] > 1


def test_only_a_driver_that_reads_results_at_the_end_may_group():
    pool = BlockPool(10, 4)
    with pytest.raises(ValueError, match="emit_outputs"):
        make_scheduler("chunked", pool, _Engine, 40).enable_decode_group(0)  # it streams every token
    sched = make_scheduler("prefill_only", pool, _Engine, 40)
    sched.emit_outputs = False
    with pytest.raises(ValueError, match="keep decoding"):
        sched.enable_decode_group(0)  # its requests leave after their first token
