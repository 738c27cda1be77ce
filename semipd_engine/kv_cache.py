"""The paged KV pool and its block allocator.

`KVCache` is one preallocated tensor [layers, 2, blocks, kv_heads, block_size,
head_dim]; each layer's K and V are views of it. On CPU it lives in shared
memory (`share_memory_()`), so another process (semi-PD's workers) can map the
same pages; on CUDA it can be shared by IPC handle.

`BlockPool` hands out block ids. It is plain bookkeeping, kept apart from the
tensor so the allocator can have exactly one owner while several workers read
and write the blocks it handed out.
"""

from __future__ import annotations

import contextlib
import math

import torch

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


class BlockPool:
    """Block-id allocator with an admission watermark.

    The state is three small tensors (a free stack, its height, per-block used
    flags). `share(lock)` moves them to shared memory and guards every
    check-take-update with a cross-process lock, so two workers can allocate
    from one pool: semi-PD's prefill and decode workers do.
    """

    def __init__(self, num_blocks: int, block_size: int, watermark: float = 0.0):
        self.num_blocks, self.block_size = num_blocks, block_size
        self.watermark_blocks = int(watermark * num_blocks)
        self._stack = torch.arange(num_blocks - 1, -1, -1, dtype=torch.int32)  # pops 0, 1, 2, ...
        self._top = torch.tensor([num_blocks], dtype=torch.int64)
        self._used = torch.zeros(num_blocks, dtype=torch.bool)
        self._lock = None

    def share(self, lock) -> BlockPool:
        for t in (self._stack, self._top, self._used):
            t.share_memory_()
        self._lock = lock
        return self

    def _guard(self):
        return self._lock if self._lock is not None else contextlib.nullcontext()

    @property
    def num_free(self) -> int:
        return int(self._top[0])

    @property
    def num_used(self) -> int:
        return self.num_blocks - self.num_free

    def blocks_needed(self, num_tokens: int, have: int) -> int:
        return max(0, math.ceil(num_tokens / self.block_size) - have)

    def can_allocate(self, n: int, admission: bool = False) -> bool:
        reserve = self.watermark_blocks if admission else 0
        return n <= self.num_free - reserve

    def try_allocate(self, n: int, admission: bool = False) -> list[int] | None:
        """Atomically check and take `n` blocks; None when they are not there."""
        with self._guard():
            top = int(self._top[0])
            reserve = self.watermark_blocks if admission else 0
            if n > top - reserve:
                return None
            ids = self._stack[top - n : top].flip(0)
            if bool(self._used[ids].any()):
                raise RuntimeError(f"allocator corrupted: a free block is marked used in {ids.tolist()}")
            self._used[ids] = True
            self._top[0] = top - n
            return ids.tolist()

    def allocate(self, n: int) -> list[int]:
        out = self.try_allocate(n)
        if out is None:
            raise MemoryError(f"asked for {n} KV blocks, {self.num_free} free")
        return out

    def free(self, blocks: list[int]) -> None:
        if not blocks:
            return
        ids = torch.tensor(blocks, dtype=torch.int32)
        with self._guard():
            if not bool(self._used[ids].all()) or len(set(blocks)) != len(blocks):
                raise RuntimeError(f"KV block freed twice among {blocks}")
            self._used[ids] = False
            top = int(self._top[0])
            self._stack[top : top + len(blocks)] = ids
            self._top[0] = top + len(blocks)
