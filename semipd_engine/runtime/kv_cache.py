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

import torch

from semipd_engine.core.block_pool import BlockPool
from semipd_engine.model.spec import ModelSpec


class KVCache:
    layout = "head_major"  # what attention backends declare they read (`kv_layout`)

    def __init__(self, spec: ModelSpec, num_blocks: int, block_size: int, dtype: torch.dtype,
                 device: str = "cpu", share: bool = True):
        self.num_blocks, self.block_size = num_blocks, block_size
        # Head-major blocks: a gathered block is [kv_heads, block_size, head_dim], so decode attention
        # can run per block over gathered K/V without re-laying them out (see model/attention.py).
        shape = (spec.num_layers, 2, num_blocks, spec.num_kv_heads, block_size, spec.head_dim)
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

    semi-PD's prefill and decode workers allocate from one pool: the free stack,
    its height and the used flags are shared tensors, and every check-take-update
    runs under the lock, so the two workers never hand out the same block.
    """

    def __init__(self, num_blocks: int, block_size: int, watermark: float, lock):
        super().__init__(num_blocks, block_size, watermark)
        self._stack = torch.arange(num_blocks - 1, -1, -1, dtype=torch.int32)
        self._top = torch.tensor([num_blocks], dtype=torch.int64)
        self._used_t = torch.zeros(num_blocks, dtype=torch.bool)
        for t in (self._stack, self._top, self._used_t):
            t.share_memory_()
        self._lock = lock
        self._free = self._used = None  # the plain-Python state is not used: one source of truth

    @property
    def num_free(self) -> int:
        return int(self._top[0])

    def try_allocate(self, n: int, admission: bool = False) -> list[int] | None:
        with self._lock:
            top = int(self._top[0])
            reserve = self.watermark_blocks if admission else 0
            if n > top - reserve:
                return None
            ids = self._stack[top - n : top].flip(0)
            if bool(self._used_t[ids].any()):
                raise RuntimeError(f"allocator corrupted: a free block is marked used in {ids.tolist()}")
            self._used_t[ids] = True
            self._top[0] = top - n
            return ids.tolist()

    def free(self, blocks: list[int]) -> None:
        if not blocks:
            return
        ids = torch.tensor(blocks, dtype=torch.int32)
        with self._lock:
            if not bool(self._used_t[ids].all()) or len(set(blocks)) != len(blocks):
                raise RuntimeError(f"KV block freed twice among {blocks}")
            self._used_t[ids] = False
            top = int(self._top[0])
            self._stack[top : top + len(blocks)] = ids
            self._top[0] = top + len(blocks)
