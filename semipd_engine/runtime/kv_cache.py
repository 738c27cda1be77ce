"""The paged KV pool and its block allocator.

`KVCache` is one preallocated tensor [layers, 2, blocks, kv_heads, block_size,
head_dim]; each layer's K and V are views of it. On CPU it lives in shared
memory (`share_memory_()`), so another process (semi-PD's workers) can map the
same pages; on CUDA it can be shared by IPC handle.

Block ids are handed out by `semipd_engine.core.block_pool.BlockPool` (plain
Python); `SharedBlockPool` here is its shared-memory twin for engines whose
workers allocate from one pool.
"""

from __future__ import annotations

from typing import Optional

import numpy as np
import torch

from semipd_engine.core.block_pool import BlockPool
from semipd_engine.model.spec import ModelSpec


class KVCache:
    layout = "head_major"  # what attention backends declare they read (`kv_layout`)

    def __init__(self, spec: ModelSpec, num_blocks: int, block_size: int, dtype: torch.dtype,
                 device: str = "cpu", share: bool = True, scratch: Optional[bool] = None):
        self.num_blocks, self.block_size = num_blocks, block_size
        # One block past the allocator's, never handed to a request: the padded rows of a CUDA graph's batch
        # write and read it (runtime/cuda_graph.py). Only where graphs can run, unless asked for.
        if scratch is None:
            scratch = torch.device(device).type == "cuda"
        self.scratch_block: Optional[int] = num_blocks if scratch else None
        # Head-major blocks: a gathered block is [kv_heads, block_size, head_dim], so decode attention
        # can run per block over gathered K/V without re-laying them out (see model/attention.py).
        shape = (spec.num_layers, 2, num_blocks + int(scratch), spec.num_kv_heads, block_size, spec.head_dim)
        self.data = torch.zeros(shape, dtype=dtype, device=device)
        if share and self.data.device.type == "cpu":
            self.data.share_memory_()

    def layer(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.data[i, 0], self.data[i, 1]

    def layers(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        return [self.layer(i) for i in range(self.data.shape[0])]

    @property
    def nbytes(self) -> int:
        return self.data.numel() * self.data.element_size()

    @staticmethod
    def blocks_for_memory(spec: ModelSpec, block_size: int, dtype: torch.dtype, megabytes: int) -> int:
        per_block = spec.kv_bytes_per_token(torch.tensor([], dtype=dtype).element_size()) * block_size
        return max(1, (megabytes * 2**20) // per_block)


class SharedBlockPool(BlockPool):
    """`BlockPool` whose state lives in shared memory behind a cross-process lock.

    semi-PD's prefill and decode workers allocate from one pool, and share one prefix cache: the free stack,
    the reference counts, each block's prefix hash, the LRU stamps of cached unreferenced blocks and the hash
    index (open addressing, linear probing) are shared tensors, read and written through numpy views, and every
    check-take-update runs under the lock, so the two workers never hand out the same block and a block one
    worker found cached cannot be evicted under it unnoticed (`try_allocate` checks each hit's hash again).
    """

    def __init__(self, num_blocks: int, block_size: int, watermark: float, lock, prefix_caching: bool = False):
        super().__init__(num_blocks, block_size, watermark, prefix_caching)
        slots = 1 << max(4, (2 * num_blocks - 1).bit_length())  # >= 2x the blocks: short probe runs
        self._t = {
            "stack": torch.arange(num_blocks - 1, -1, -1, dtype=torch.int32),  # uncached free blocks
            "top": torch.tensor([num_blocks], dtype=torch.int64),
            "ref": torch.zeros(num_blocks, dtype=torch.int32),
            "hash": torch.zeros(num_blocks, dtype=torch.int64),
            "hashed": torch.zeros(num_blocks, dtype=torch.bool),
            "stamp": torch.zeros(num_blocks, dtype=torch.int64),  # > 0: cached, unreferenced; smaller = older
            "counters": torch.zeros(2, dtype=torch.int64),  # the stamp clock, the number of stamped blocks
            "keys": torch.zeros(slots, dtype=torch.int64),
            "vals": torch.full((slots,), -1, dtype=torch.int32),  # -1: an empty slot
        }
        for t in self._t.values():
            t.share_memory_()
        self._lock = lock
        self._mask = slots - 1
        self._v = None
        self._free = self._ref = self._hash = self._cached = self._evictable = None  # one source of truth: _t

    def __getstate__(self):
        return {**self.__dict__, "_v": None}  # numpy views are remade over the shared pages in each process

    @property
    def v(self):
        if self._v is None:
            self._v = {k: t.numpy() for k, t in self._t.items()}
        return self._v

    @property
    def num_free(self) -> int:
        v = self.v
        return int(v["top"][0] + v["counters"][1])

    @property
    def num_cached(self) -> int:
        return int(self.v["hashed"].sum())

    # -- the hash index ----------------------------------------------------------------------------
    def _slot(self, h: int) -> int:
        v, mask = self.v, self._mask
        keys, vals = v["keys"], v["vals"]
        i = h & mask
        while vals[i] != -1 and keys[i] != h:
            i = (i + 1) & mask
        return i

    def _unindex(self, h: int) -> None:
        v, mask = self.v, self._mask
        keys, vals = v["keys"], v["vals"]
        i = self._slot(h)
        j = i
        while True:  # backward-shift deletion: no tombstones, probe runs stay short
            j = (j + 1) & mask
            if vals[j] == -1:
                break
            home = int(keys[j]) & mask
            if (i <= j and (home <= i or home > j)) or (i > j and home <= i and home > j):
                keys[i], vals[i] = keys[j], vals[j]
                i = j
        vals[i] = -1

    def cached_block(self, h: int):
        with self._lock:
            b = int(self.v["vals"][self._slot(h)])
        return None if b < 0 else b

    # -- allocation --------------------------------------------------------------------------------
    def try_allocate(self, n: int, admission: bool = False, hit=()) -> list[int] | None:
        v = self.v
        ref, stamp, counters = v["ref"], v["stamp"], v["counters"]
        with self._lock:
            for b, h in hit:
                if not (v["hashed"][b] and v["hash"][b] == h):
                    return None  # evicted by the other worker since it was found: look again next iteration
            top = int(v["top"][0])
            revive = sum(1 for b, _ in hit if ref[b] == 0)
            reserve = self.watermark_blocks if admission else 0
            if n + revive > top + int(counters[1]) - reserve:
                return None
            for b, _ in hit:
                if ref[b] == 0:
                    stamp[b] = 0
                    counters[1] -= 1
                ref[b] += 1
            ids = []
            for _ in range(n):
                if top > 0:
                    top -= 1
                    b = int(v["stack"][top])
                else:
                    b = int(np.where(stamp > 0, stamp, np.iinfo(np.int64).max).argmin())  # least recently freed
                    stamp[b] = 0
                    counters[1] -= 1
                    self._unindex(int(v["hash"][b]))
                    v["hashed"][b] = False
                if ref[b]:
                    raise RuntimeError(f"allocator corrupted: free block {b} is referenced")
                ref[b] = 1
                ids.append(b)
            v["top"][0] = top
            return ids

    def free(self, blocks: list[int]) -> None:
        if not blocks:
            return
        v = self.v
        ref, stamp, counters = v["ref"], v["stamp"], v["counters"]
        with self._lock:
            if len(set(blocks)) != len(blocks) or not bool((ref[blocks] > 0).all()):
                raise RuntimeError(f"KV block freed twice among {blocks}")
            top = int(v["top"][0])
            for b in reversed(blocks):
                ref[b] -= 1
                if ref[b] == 0:
                    if v["hashed"][b]:
                        counters[0] += 1
                        stamp[b] = counters[0]
                        counters[1] += 1
                    else:
                        v["stack"][top] = b
                        top += 1
            v["top"][0] = top

    def retire(self, blocks: list[int], registered: int, hashed: bool = True) -> None:
        raise NotImplementedError("retire is the simulator's (placeholder tokens): a worker process's pool frees")

    def release(self, req, blocks: list[int], registered: int) -> None:
        raise NotImplementedError("release is the simulator's (placeholder tokens): a worker process's pool frees")

    def cache(self, block: int, h: int) -> None:
        v = self.v
        with self._lock:
            if v["hashed"][block]:
                return
            i = self._slot(h)
            if v["vals"][i] != -1:
                return  # the same prefix is cached in another block already
            v["keys"][i], v["vals"][i] = h, block
            v["hash"][block], v["hashed"][block] = h, True

    def cache_many(self, blocks, hashes) -> None:
        for b, h in zip(blocks, hashes):
            self.cache(b, h)

    def reset_cache(self) -> None:
        v = self.v
        with self._lock:
            top = int(v["top"][0])
            for b in np.flatnonzero(v["stamp"] > 0):
                v["stack"][top] = b
                top += 1
            v["top"][0] = top
            v["stamp"][:] = 0
            v["counters"][1] = 0
            v["hashed"][:] = False
            v["vals"][:] = -1
