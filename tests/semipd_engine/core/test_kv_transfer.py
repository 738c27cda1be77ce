"""KV transfers into a pool with a prefix cache: only the blocks the receiver lacks are copied."""

from __future__ import annotations

from semipd_engine.core import block_pool
from semipd_engine.core.block_pool import BlockPool
from semipd_engine.core.kv_transfer import TransferQueue
from semipd_engine.core.policies import DecodeOnly
from semipd_engine.core.request import Request, SamplingParams


def _prefilled(rid: str, tokens: list[int], src: BlockPool) -> Request:
    """A request whose prompt the prefill instance computed, in blocks of `src`."""
    r = Request(rid, list(tokens), SamplingParams(max_tokens=4, temperature=0.0))
    r.block_table = src.try_allocate(src.blocks_needed(len(tokens), 0))
    r.num_computed_tokens = len(tokens)
    r.output_token_ids.append(1)  # sampled by the prefill iteration, not yet computed
    return r


def test_a_transfer_copies_only_the_blocks_the_receiver_holds_no_cached_copy_of():
    src, dst = BlockPool(32, 4, prefix_caching=True), BlockPool(32, 4, prefix_caching=True)
    copied: list[tuple[list[int], list[int]]] = []

    def copy(t, blocks):
        copied.append((list(t.src_blocks), list(blocks)))
        return 10 * len(blocks), 0.0

    q = TransferQueue(dst, copy)
    first = _prefilled("a", list(range(100, 110)), src)  # 2 full blocks + 2 tokens
    sent = list(first.block_table)
    q.offer(first, "p")
    [(_, nbytes, _, cached)] = q.pull()
    assert (nbytes, cached) == (30, 0) and copied[-1] == (sent, first.block_table)
    assert dst.num_cached == 2  # the full blocks it received are cached where they now are
    # a next turn: the same 10 tokens and 6 more; its first two blocks are in the receiver already
    second = _prefilled("b", list(range(100, 116)), src)
    sent = list(second.block_table)
    q.offer(second, "p")
    [(_, nbytes, _, cached)] = q.pull()
    assert (nbytes, cached) == (20, 2)
    assert copied[-1] == (sent[2:], second.block_table[2:]) and second.block_table[:2] == first.block_table[:2]
    assert second.num_registered_blocks == 4 and dst.num_cached == 4
    dst.free(first.block_table)
    dst.free(second.block_table)
    assert dst.num_used == 0  # every reference the hits took is given back
    # without a cache every block is copied
    plain = TransferQueue(BlockPool(32, 4), copy)
    plain.offer(_prefilled("c", list(range(100, 116)), src), "p")
    assert plain.pull()[0][1:] == (40, 0.0, 0)


def _decode_until_a_preemption(monkeypatch, eager: bool):
    """Two placeholder requests pulled into a decode pool with room for one more block: the first decode step
    preempts the second before any iteration ran. `eager`: every request's blocks registered as they arrive."""
    if eager:
        monkeypatch.setattr(block_pool, "private_blocks", lambda req: False)
    src, dst = BlockPool(32, 4, prefix_caching=True), BlockPool(5, 4, prefix_caching=True)
    q, sched = TransferQueue(dst, lambda t, blocks: (0, 0.0)), DecodeOnly(dst, 8, 64, 1000)
    reqs = []
    for i in range(2):
        r = Request(f"s{i}", [0] * 8, SamplingParams(max_tokens=4, ignore_eos=True), cache_salt=f"s{i}",
                    placeholder_tokens=True)
        r.block_table, r.num_computed_tokens = src.try_allocate(2), 8
        r.output_token_ids.append(1)
        q.offer(r, "p")
        reqs.append(r)
    for t, *_ in q.pull():
        sched.adopt(t.request)
    on_arrival = dst.num_cached
    batch = sched.schedule(0.0)
    left = {h: dst.cached_block(h) for h in block_pool.prefix_hashes(reqs[1], 4, 2)}  # the preempted one's blocks
    return on_arrival, [r.request_id for r in batch.preempted], left, dst.num_free


def test_a_placeholder_requests_blocks_register_as_it_leaves_not_as_it_arrives(monkeypatch):
    """Nobody can look a never-preempted placeholder request's blocks up while it holds them: pulled in, they are
    not registered; preempted, they are, as if registered on arrival (cached in the same blocks, findable when it
    returns; the same free count)."""
    deferred = _decode_until_a_preemption(monkeypatch, eager=False)
    eager = _decode_until_a_preemption(monkeypatch, eager=True)
    assert (deferred[0], eager[0]) == (0, 4)
    assert deferred[1:] == eager[1:] and deferred[1] == ["s1"]
    assert None not in deferred[2].values()
