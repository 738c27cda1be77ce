"""The KV block allocator, with its prefix cache: plain bookkeeping of block ids, no tensors.

It is kept apart from the KV tensor (semipd_engine.runtime.kv_cache) so the policies and
the simulator can allocate without torch, and so one allocator can have exactly
one owner while several workers read and write the blocks it handed out.
`SharedBlockPool` (kv_cache.py) keeps the same state in shared memory for the
multi-process engines.

Prefix caching (as vLLM's, on by default): a block whose tokens are all computed is
registered under a hash chained over every token up to its end (`prefix_hashes`), so
two requests whose prompts begin alike share the blocks of their common full-block
prefix. Blocks are reference counted; one that nobody references but that holds a
registered prefix stays cached, least recently freed first out, and is evicted only
when a fresh block is needed. `num_free` counts those too: a cached block is free to
take. A finished request whose blocks nobody can look up again (`retire`) leaves them in the eviction order
unhashed, as one run, so they cost nothing per block to register or to evict; a simulated request released by a
KV transfer's sender (`release`) leaves its blocks as one run too, registered only if it looks them up again.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from collections.abc import Sequence
from operator import itemgetter
from typing import Optional

ROOT_HASH = 0x5E1FD  # the chain's seed for requests without a cache salt


def salt_hash(salt: Optional[str]) -> int:
    """The chain's seed: stable across processes (str hashes are randomised per interpreter)."""
    if salt is None:
        return ROOT_HASH
    return int.from_bytes(hashlib.blake2b(salt.encode(), digest_size=8).digest(), "little", signed=True)


def private_blocks(req) -> bool:
    """No lookup but the request's own can match its blocks' prefix hashes, and no pool holds an earlier copy of
    them: the simulator's placeholder tokens (hashed by the request's own salt) of a request never preempted (a
    preempted one's copy would decide where a recomputed block goes). While it holds them nobody looks them up, so
    registering them as it leaves gives the cache that registering them as they fill gives; once it is done,
    nobody ever will (`BlockPool.retire`)."""
    return req.placeholder_tokens and not req.times.preemptions


def prefix_hashes(req, block_size: int, num_blocks: int) -> list[int]:
    """`req.block_hashes`, extended to (at least) its first `num_blocks` full blocks: computed once per request.

    Block i's hash covers tokens [0, (i+1) x block_size) through the chain, and the request's cache salt: equal
    hashes mean equal KV (same model, same tokens at the same positions). Python's hash of a tuple of ints is
    the same in every process; 64 bits make a collision among a pool's blocks negligible (~n^2 / 2^65).
    """
    hs = req.block_hashes
    if len(hs) < num_blocks:
        prev = hs[-1] if hs else salt_hash(req.cache_salt)
        if req.placeholder_tokens:  # the simulator's stand-in tokens: the salt and the position say it all
            for i in range(len(hs), num_blocks):
                prev = hash((prev, i))
                hs.append(prev)
        else:
            for i in range(len(hs), num_blocks):
                prev = hash((prev, *req.token_ids(i * block_size, (i + 1) * block_size)))
                hs.append(prev)
    return hs


def cached_prefix(pool, req, num_blocks: int) -> list[tuple[int, int]]:
    """The (block, hash) pairs of `pool`'s cached copies of `req`'s first `num_blocks` full blocks, as far as the
    cache matches (no reference taken: `try_allocate(..., hit=)` takes them)."""
    bs, hs, out = pool.block_size, req.block_hashes, []
    for i in range(num_blocks):  # hashed as far as the cache matches, no further
        if i == len(hs):
            prefix_hashes(req, bs, i + 1)
        b = pool.cached_block(hs[i])
        if b is None:
            break
        out.append((b, hs[i]))
    return out


def cache_blocks(pool, req, start: int, end: int) -> None:
    """Register blocks `start`..`end` of `req`'s block table (full, computed) under their prefix hashes."""
    pool.cache_many(req.block_table[start:end], prefix_hashes(req, pool.block_size, end)[start:end])


def register_computed(pool, req) -> None:
    """Register every block of `req`'s block table its computed tokens fill (those not registered yet)."""
    full = min(req.num_computed_tokens // pool.block_size, len(req.block_table))
    if full > req.num_registered_blocks:
        cache_blocks(pool, req, req.num_registered_blocks, full)
        req.num_registered_blocks = full


def free_request(pool, req) -> None:
    """Free `req`'s blocks, first registering those its computed tokens fill: a private request's register as it
    leaves (`private_blocks`); anyone else's are registered already, so that is a no-op."""
    if req.block_table:
        if pool.prefix_caching:
            register_computed(pool, req)
        pool.free(req.block_table)
        req.block_table = []


def _values(xs: list, idx: list[int]) -> tuple:
    """(xs[i] for i in idx) as a tuple, gathered in C."""
    if len(idx) > 1:
        return itemgetter(*idx)(xs)
    return (xs[idx[0]],) if idx else ()


def _pop(stack: list[int], n: int) -> list[int]:
    """`[stack.pop() for _ in range(n)]`, in C."""
    if not n:
        return []
    out = stack[-n:]
    del stack[-n:]
    out.reverse()
    return out


class _Run:
    """A finished request's retired blocks, one entry of the eviction order: tail first from `start` (the order
    `free` leaves them in); evictions take them from `start` on, the rest keeping the entry's place."""

    __slots__ = ("blocks", "start")

    def __init__(self, blocks: list[int]):
        self.blocks, self.start = blocks, 0


class _Released(_Run):
    """A released private request's full blocks, registered only once its first block's hash is looked up
    (`key`). It carries the request's hash chain, not the request (a pool outlives its requests)."""

    __slots__ = ("block_hashes", "cache_salt", "key", "registered")
    placeholder_tokens = True  # what `prefix_hashes` reads of it, as of the request

    def __init__(self, blocks: list[int], req, key: int):
        super().__init__(blocks)
        self.key, self.registered = key, False
        self.block_hashes, self.cache_salt = req.block_hashes, req.cache_salt


class BlockPool:
    """Block-id allocator with an admission watermark (new prompts may not eat the last `watermark` of the pool,
    which running decodes need to grow) and, with `prefix_caching`, a cache of full blocks by prefix hash."""

    def __init__(self, num_blocks: int, block_size: int, watermark: float = 0.0, prefix_caching: bool = False):
        if num_blocks < 1 or block_size < 1:
            raise ValueError(f"a block pool needs num_blocks >= 1 and block_size >= 1, got {num_blocks}, {block_size}")
        self.num_blocks, self.block_size = num_blocks, block_size
        self.watermark_blocks = int(watermark * num_blocks)
        self.prefix_caching = prefix_caching
        self._free = list(range(num_blocks - 1, -1, -1))  # a stack of uncached free blocks: pops 0, 1, 2, ...
        self._ref = [0] * num_blocks
        self._hash: list[Optional[int]] = [None] * num_blocks
        self._cached: dict[int, int] = {}  # prefix hash -> block
        # Unreferenced blocks in eviction order, least recently freed first: a cached block (its id), a retired
        # run of blocks nobody can look up (`_Run`), or a released private request's (`_Released`, registered
        # when looked up).
        self._evictable: OrderedDict[int | _Run, None] = OrderedDict()
        self._num_evictable = 0
        self._released: dict[int, _Released] = {}  # not yet looked up, by the hash of the request's first block
        self._num_released = 0  # their blocks: cached, though not in `_cached` yet
        self._released_of: dict[int, _Released] = {}  # a looked-up release's blocks -> it

    @property
    def num_free(self) -> int:
        return len(self._free) + self._num_evictable

    @property
    def num_used(self) -> int:
        """Blocks some request references."""
        return self.num_blocks - self.num_free

    @property
    def num_cached(self) -> int:
        return len(self._cached) + self._num_released

    def blocks_needed(self, num_tokens: int, have: int) -> int:
        return max(0, -(-num_tokens // self.block_size) - have)

    def cached_block(self, h: int) -> Optional[int]:
        """The block cached under prefix hash `h` (no reference taken: `try_allocate(..., hit=)` takes it)."""
        b = self._cached.get(h)
        if b is None and self._released:
            run = self._released.pop(h, None)
            if run is not None:
                self._register_released(run)
                b = self._cached.get(h)
        return b

    def _register_released(self, run: _Released) -> None:
        """Register what is left of a release, as `cache_many` would have when its request filled the blocks (the
        request's first blocks: evictions took its tail), where the release stands in the eviction order."""
        left = run.blocks[run.start:]
        n = len(left)
        hs = prefix_hashes(run, self.block_size, n)
        cached, owner, of = self._cached, self._hash, self._released_of
        for i in range(n):
            b = left[n - 1 - i]
            of[b] = run
            if owner[b] is None and hs[i] not in cached:
                cached[hs[i]] = b
                owner[b] = hs[i]
        run.registered = True
        self._num_released -= n

    def try_allocate(self, n: int, admission: bool = False,
                     hit: Sequence[tuple[int, int]] = ()) -> list[int] | None:
        """Take `n` fresh blocks and a reference on each cached (block, hash) of `hit`, or nothing when the pool cannot
        (behind the watermark for admissions). Fresh blocks come from the uncached ones first, then by evicting
        the least recently freed cached block."""
        reserve = self.watermark_blocks if admission else 0
        ref, free = self._ref, self._free
        if not hit and n <= len(free) - reserve:  # the common case: uncached free blocks are enough
            ids = _pop(free, n)
            for b in ids:  # checked as set: cheaper than a gather first, for the one or two blocks of a decode
                if ref[b]:
                    raise RuntimeError(f"allocator corrupted: free block {b} is referenced")
                ref[b] = 1
            return ids
        revive = sum(1 for b, _ in hit if ref[b] == 0) if hit else 0
        if n + revive > len(free) + self._num_evictable - reserve:
            return None
        if hit:
            for b, _ in hit:
                if ref[b] == 0:
                    run = self._released_of.pop(b, None) if self._released_of else None
                    if run is None:
                        del self._evictable[b]
                    else:  # out of its release's entry, the rest keeping their places
                        del run.blocks[run.blocks.index(b, run.start)]
                        if run.start == len(run.blocks):
                            del self._evictable[run]
                ref[b] += 1
            self._num_evictable -= revive
        take = min(n, len(free))  # the uncached ones first, then evictions, least recently freed first
        ids = _pop(free, take)
        if take < n:
            evictable, cached, hashes = self._evictable, self._cached, self._hash
            need = n - take
            self._num_evictable -= need
            while need:
                b = next(iter(evictable))
                if type(b) is int:
                    del evictable[b]
                    del cached[hashes[b]]
                    hashes[b] = None
                    ids.append(b)
                    need -= 1
                else:
                    need -= self._evict_run(b, need, ids)
        for b in ids:
            if ref[b]:
                raise RuntimeError(f"allocator corrupted: free block {b} is referenced")
            ref[b] = 1
        return ids

    def _evict_run(self, run: _Run, need: int, ids: list[int]) -> int:
        """Take up to `need` blocks from the head of a run, at the head of the eviction order (what is left of it
        stays there); returns how many."""
        start, end = run.start, len(run.blocks)
        taken = run.blocks[start:start + need]
        run.start = start = start + len(taken)
        if type(run) is _Released:
            if run.registered:
                cached, hashes, of = self._cached, self._hash, self._released_of
                for b in taken:
                    del of[b]
                    h = hashes[b]
                    if h is not None:
                        del cached[h]
                        hashes[b] = None
            else:
                self._num_released -= len(taken)
                if start == end:
                    del self._released[run.key]
        ids += taken
        if start == end:
            del self._evictable[run]
        return len(taken)

    def free(self, blocks: list[int]) -> None:
        """Drop one reference on each block. Its tail first, so a sequence's own tail is evicted before the head
        it may share."""
        ref, hashes = self._ref, self._hash
        if len(set(blocks)) != len(blocks) or (blocks and min(map(ref.__getitem__, blocks)) <= 0):
            raise RuntimeError(f"KV block freed twice among {blocks}")
        free, evictable = self._free, self._evictable
        for b in reversed(blocks):
            r = ref[b] = ref[b] - 1
            if r == 0:
                if hashes[b] is None:
                    free.append(b)
                else:
                    evictable[b] = None
                    self._num_evictable += 1

    def retire(self, blocks: list[int], registered: int, hashed: bool = True) -> None:
        """`free` a finished request's blocks (each held by it alone) when nobody can ever look them up again: the
        simulator's placeholder tokens, hashed by the request's own salt, of a request never preempted (so this
        pool holds no other copy of them). Where `free` would leave them after the request's first `registered`
        blocks were registered (those in the eviction order, the rest on the free list), they go, the first
        ones as one unhashed run: later allocations evict the same cached blocks at the same moments, and
        nothing is hashed, indexed or evicted block by block for a prefix no lookup can match. `hashed`: False when
        the request registered none of them (its `num_registered_blocks` is 0), so none is looked at."""
        self._unref_sole(blocks, registered, "retire")
        if hashed:
            hashes = self._hash
            hs = _values(hashes, blocks)
            if hs.count(None) != len(hs):  # registered ones (a private request's are, once its group dissolved)
                for b, h in zip(blocks, hs):
                    if h is not None:
                        del self._cached[h]
                        hashes[b] = None
        if registered:
            self._evictable[_Run(blocks[registered - 1::-1])] = None
            self._num_evictable += registered

    def _unref_sole(self, blocks: list[int], registered: int, what: str) -> None:
        """Drop a request's references on blocks it alone holds, its blocks past the first `registered` onto the
        free list, where `free` would put them (the caller places the first ones)."""
        ref = self._ref
        for i, b in enumerate(blocks):  # checked as dropped (a repeated block finds its reference gone)
            if ref[b] != 1:
                for d in blocks[:i]:
                    ref[d] = 1
                raise RuntimeError(f"{what}: block {b} shared or freed twice among {blocks}")
            ref[b] = 0
        self._free.extend(reversed(blocks[registered:]))

    def release(self, req, blocks: list[int], registered: int) -> None:
        """`free` the blocks of a request whose blocks only its own lookups can match (`private_blocks`: none of
        them registered yet, each held by it alone) once its first `registered` are full and computed, while it
        lives on elsewhere (a KV transfer's sender, the copy done). They go where registering and freeing them
        would put them (the rest on the free list, those in the eviction order as one entry) and are registered
        only if the request looks its first block up here again, back after a preemption."""
        if not req.placeholder_tokens:
            raise ValueError(f"release: {req.request_id}'s tokens are real: free its blocks")
        if _values(self._hash, blocks).count(None) != len(blocks):
            raise RuntimeError(f"release: a block registered among {blocks}")
        self._unref_sole(blocks, registered, "release")
        if registered:
            key = prefix_hashes(req, self.block_size, 1)[0]
            if key in self._released:
                raise RuntimeError(f"release: {req.request_id} released twice")
            run = self._released[key] = _Released(blocks[registered - 1::-1], req, key)
            self._evictable[run] = None
            self._num_evictable += registered
            self._num_released += registered

    def cache(self, block: int, h: int) -> None:
        """Register a block whose tokens are all computed under its prefix hash (a first copy wins: a block
        computed again by a request that missed it stays private)."""
        self.cache_many((block,), (h,))

    def cache_many(self, blocks: Sequence[int], hashes: Sequence[int]) -> None:
        """`cache` each (block, hash) in turn."""
        cached, owner = self._cached, self._hash
        for b, h in zip(blocks, hashes):
            if owner[b] is None and h not in cached:
                cached[h] = b
                owner[b] = h

    def reset_cache(self) -> None:
        """Forget every cached prefix (what vLLM's /reset_prefix_cache does); referenced blocks stay."""
        for b in self._evictable:
            if type(b) is int:
                self._free.append(b)
            else:
                self._free.extend(b.blocks[b.start:])
        self._evictable.clear()
        self._num_evictable = 0
        self._released.clear()
        self._released_of.clear()
        self._num_released = 0
        for b in self._cached.values():
            self._hash[b] = None
        self._cached.clear()
