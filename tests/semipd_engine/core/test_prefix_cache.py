"""The prefix cache in the block pool: both implementations (plain Python, and shared memory for semi-PD's
two workers) behave alike, and the scheduler computes only what is not cached."""

from __future__ import annotations

import multiprocessing

import pytest

from semipd_engine.core.block_pool import BlockPool, prefix_hashes
from semipd_engine.core.policies import make_scheduler
from semipd_engine.core.request import Request, SamplingParams
from semipd_engine.core.scheduler import ExecuteResult
from tests.helpers import engine_cfg


def _pool(kind: str, n: int = 8, bs: int = 4, watermark: float = 0.0) -> BlockPool:
    if kind == "plain":
        return BlockPool(n, bs, watermark, prefix_caching=True)
    from semipd_engine.runtime.kv_cache import SharedBlockPool

    return SharedBlockPool(n, bs, watermark, multiprocessing.get_context("spawn").Lock(), prefix_caching=True)


KINDS = ["plain", "shared"]


def _req(rid: str, tokens: list[int], salt=None) -> Request:
    return Request(rid, list(tokens), SamplingParams(max_tokens=4, temperature=0.0), cache_salt=salt)


def test_hashes_chain_over_the_whole_prefix_and_the_salt():
    a, b = _req("a", [1, 2, 3, 4, 5, 6, 7, 8]), _req("b", [9, 2, 3, 4, 5, 6, 7, 8])
    ha, hb = prefix_hashes(a, 4, 2), prefix_hashes(b, 4, 2)
    assert ha[1] != hb[1]  # same second block, different first: different prefixes
    assert prefix_hashes(_req("c", [1, 2, 3, 4, 0, 0, 0, 0]), 4, 1)[0] == ha[0]
    assert prefix_hashes(_req("d", [1, 2, 3, 4], salt="x"), 4, 1)[0] != ha[0]


@pytest.mark.parametrize("kind", KINDS)
def test_cached_blocks_are_shared_counted_and_evicted_least_recently_freed_first(kind):
    pool = _pool(kind)
    a = pool.try_allocate(3)
    for i, b in enumerate(a):
        pool.cache(b, 100 + i)
    assert pool.num_cached == 3 and pool.cached_block(101) == a[1] and pool.cached_block(999) is None
    b = pool.try_allocate(1, hit=[(a[0], 100), (a[1], 101)])  # a second request shares a's first two blocks
    assert pool.num_used == 4
    pool.free(a)  # a's tail (uncached or unshared) goes first; blocks still referenced stay
    assert pool.num_used == 3 and pool.num_free == 5
    assert pool.cached_block(102) == a[2]  # freed, still cached
    assert pool.try_allocate(4) is not None  # the 4 uncached free blocks
    c = pool.try_allocate(1)  # nothing uncached left: the least recently freed cached block goes
    assert c == [a[2]] and pool.cached_block(102) is None and pool.cached_block(100) == a[0]
    assert pool.try_allocate(1) is None  # the rest is referenced
    pool.free([a[0], a[1]])
    pool.free(b)
    assert pool.num_cached == 2 and pool.num_free == 3
    with pytest.raises(RuntimeError, match="freed twice"):
        pool.free([a[0]])


@pytest.mark.parametrize("kind", KINDS)
def test_a_stale_hit_is_refused_and_the_first_copy_wins(kind):
    pool = _pool(kind, n=2)
    a = pool.try_allocate(1)
    pool.cache(a[0], 7)
    other = pool.try_allocate(1)
    pool.cache(other[0], 7)  # the same prefix computed twice: the first copy stays the cached one
    assert pool.cached_block(7) == a[0]
    pool.free(a)
    pool.free(other)
    got = pool.try_allocate(2)  # evicts a's cached block
    assert pool.cached_block(7) is None
    pool.free(got)
    if kind == "shared":  # a hit found before the eviction is checked again
        assert pool.try_allocate(0, hit=[(a[0], 7)]) is None


@pytest.mark.parametrize("kind", KINDS)
def test_many_cached_blocks_evicted_in_any_order_keep_the_index_whole(kind):
    import random

    rng = random.Random(0)
    pool = _pool(kind, n=64)
    live: dict[int, int] = {}
    for step in range(2000):
        if rng.random() < 0.5 and pool.num_free:
            b = pool.try_allocate(1)[0]
            live = {h: x for h, x in live.items() if x != b}  # an evicted block's hash is gone
            h = rng.randrange(-2**63, 2**63)
            pool.cache(b, h)
            live[h] = b
            pool.free([b])
        else:
            for h, b in rng.sample(sorted(live.items()), min(3, len(live))):
                assert pool.cached_block(h) == b, step
    assert all(pool.cached_block(h) == b for h, b in live.items())


def test_retiring_unreachable_blocks_evicts_what_registering_and_freeing_them_evicts():
    """`retire` (blocks no lookup can match) against `cache_many` + `free`: every later allocation evicts the same
    reachable cached blocks at the same moment, and the same lookups hit."""
    import random

    rng = random.Random(1)
    a, b = BlockPool(96, 4, prefix_caching=True), BlockPool(96, 4, prefix_caching=True)
    held: list[tuple[list[int], list[int], list[int], bool]] = []  # a's blocks, b's, their hashes, unreachable
    reachable: set[int] = set()
    ever: set[int] = set()
    for step in range(3000):
        if held and (rng.random() < 0.45 or a.num_free < 12):
            ba, bb, hs, gone = held.pop(rng.randrange(len(held)))
            k = len(ba) if rng.random() < 0.7 else rng.randint(0, len(ba))  # registered by now (computed)
            a.cache_many(ba[:k], hs[:k])
            a.free(ba)
            if gone:
                b.retire(bb, k)
            else:
                b.cache_many(bb[:k], hs[:k])
                b.free(bb)
                reachable.update(hs[:k])
        else:
            n = rng.randint(1, 10)
            looked_up = rng.sample(sorted(reachable), min(2, len(reachable))) if rng.random() < 0.3 else []
            hit_a = [(a.cached_block(h), h) for h in looked_up]
            hit_a = [(x, h) for x, h in hit_a if x is not None]
            hit_b = [(b.cached_block(h), h) for _, h in hit_a]
            assert all(x is not None for x, _ in hit_b), step
            ga, gb = a.try_allocate(n, hit=hit_a), b.try_allocate(n, hit=hit_b)
            assert (ga is None) == (gb is None), step
            if ga is None:
                continue
            hs = [rng.randrange(-2**62, 2**62) for _ in range(n)]
            held.append(([x for x, _ in hit_a] + ga, [x for x, _ in hit_b] + gb, [h for _, h in hit_a] + hs,
                         not hit_a and rng.random() < 0.8))
        assert a.num_free == b.num_free, step
        ever |= reachable
        reachable = {h for h in ever if a.cached_block(h) is not None}
        assert reachable == {h for h in ever if b.cached_block(h) is not None}, step
        assert b.num_cached == len(reachable), step  # nothing retired stays indexed
    assert ever and len(ever) > len(reachable)  # cached blocks were evicted on the way


@pytest.mark.parametrize("kind", KINDS)
def test_reset_forgets_cached_prefixes_only(kind):
    pool = _pool(kind)
    a = pool.try_allocate(2)
    pool.cache(a[0], 1)
    pool.cache(a[1], 2)
    pool.free(a[1:])
    pool.reset_cache()
    assert pool.num_cached == 0 and pool.num_free == 7 and pool.cached_block(1) is None
    pool.free(a[:1])
    assert pool.num_free == 8


class _FakeExecutor:
    def execute(self, batch):
        return ExecuteResult([(r, 5) for r, n in batch.items if r.num_computed_tokens + n == r.num_tokens], 0.01)


@pytest.mark.parametrize("policy", ["prefill_priority", "chunked"])
def test_a_repeated_prompt_computes_only_its_uncached_tail(policy):
    e = engine_cfg(policy=policy, max_num_batched_tokens=64)
    pool = BlockPool(32, 4, 0.0, prefix_caching=True)
    sched = make_scheduler(policy, pool, e, 1000)
    prompt = list(range(10, 24))  # 14 tokens: 3 full blocks + 2

    def run(rid):
        req = _req(rid, prompt)
        sched.add(req)
        computed = []
        while sched.has_work():
            batch = sched.schedule(0.0)
            computed += [(r.num_computed_tokens, n) for r, n in batch.items if r is req]
            sched.update(batch, _FakeExecutor().execute(batch), 0.0)
        return req, computed

    first, c1 = run("a")
    assert c1[0] == (0, 14) and first.num_cached_tokens == 0
    second, c2 = run("b")
    assert c2[0] == (12, 2) and second.num_cached_tokens == 12  # 3 cached blocks; the tail computed
    assert second.output_token_ids == first.output_token_ids
    assert sched.prefix_queries == 28 and sched.prefix_hits == 12
    # a prompt that is all full blocks still computes its last token (it samples the next one)
    exact = _req("d", list(range(10, 26)))  # 16 tokens = 4 blocks, of which 3 cached
    sched.add(exact)
    batch = sched.schedule(0.0)
    assert [(r.num_computed_tokens, n) for r, n in batch.items] == [(12, 4)]
    assert pool.num_used == len(exact.block_table) == 4


def test_prefix_caching_off_caches_nothing():
    pool = BlockPool(32, 4)
    sched = make_scheduler("prefill_priority", pool, engine_cfg(), 1000)
    for rid in "ab":
        req = _req(rid, list(range(10, 24)))
        sched.add(req)
        batch = sched.schedule(0.0)
        assert [(r.num_computed_tokens, n) for r, n in batch.items] == [(0, 14)]
        sched.update(batch, _FakeExecutor().execute(batch), 0.0)
        sched.abort(rid)
    assert pool.num_cached == 0 and pool.num_free == 32


def test_releasing_private_blocks_evicts_and_finds_what_registering_and_freeing_them_does():
    """`release` (a private request's blocks, registered only if it looks them up again) against `cache_many` +
    `free`: every allocation takes the same block ids, every lookup finds the same blocks (released requests come
    back and look their blocks up; hits take them from the middle of a partly evicted release), the same counts."""
    import random
    from types import SimpleNamespace

    from semipd_engine.core.block_pool import prefix_hashes

    rng = random.Random(3)
    a, b = BlockPool(160, 4, prefix_caching=True), BlockPool(160, 4, prefix_caching=True)

    def req(i):  # one request as each pool's side knows it: the same salt, its own hash cache
        return [SimpleNamespace(request_id=f"r{i}", placeholder_tokens=True, cache_salt=f"r{i}", block_hashes=[])
                for _ in range(2)]

    held: list[tuple[list, list[int], list[int], bool]] = []  # (the two requests), a's blocks, b's, private
    back: list[tuple[list, int]] = []  # released requests that may return, with how many blocks they had
    hits = found = 0
    for step in range(4000):
        r = rng.random()
        if held and (r < 0.4 or a.num_free < 12):
            (ra, rb), ba, bb, private = held.pop(rng.randrange(len(held)))
            k = len(ba) if rng.random() < 0.8 else rng.randint(0, len(ba))  # full and computed by now
            if private:
                a.cache_many(ba[:k], prefix_hashes(ra, 4, k)[:k])
                a.free(ba)
                b.release(rb, bb, k)
                back.append(((ra, rb), len(ba)))
            else:  # a returned request: registered as it computed, in both
                a.cache_many(ba[:k], prefix_hashes(ra, 4, k)[:k])
                b.cache_many(bb[:k], prefix_hashes(rb, 4, k)[:k])
                a.free(ba)
                b.free(bb)
        elif back and r < 0.55:  # a released request back (after a preemption): its cached prefix, then the rest
            (ra, rb), n = back.pop(-1 - rng.randrange(min(6, len(back))))  # mostly a recent one
            hit_a, hit_b = [], []
            for i in range(n):
                xa, xb = a.cached_block(prefix_hashes(ra, 4, i + 1)[i]), b.cached_block(prefix_hashes(rb, 4, i + 1)[i])
                assert xa == xb, step
                if xa is None:
                    break
                hit_a.append((xa, ra.block_hashes[i]))
                hit_b.append((xb, rb.block_hashes[i]))
            hits += len(hit_a)
            found += bool(hit_a)
            ga, gb = a.try_allocate(n - len(hit_a), hit=hit_a), b.try_allocate(n - len(hit_b), hit=hit_b)
            assert ga == gb, step
            if ga is not None:
                held.append(((ra, rb), [x for x, _ in hit_a] + ga, [x for x, _ in hit_b] + gb, False))
        else:
            n = rng.randint(1, 10)
            ga, gb = a.try_allocate(n), b.try_allocate(n)
            assert ga == gb, step
            if ga is not None:
                held.append((req(step), ga, gb, True))
        assert (a.num_free, a.num_cached, a.num_used) == (b.num_free, b.num_cached, b.num_used), step
    assert hits > 500 and found > 100  # released blocks were found again
