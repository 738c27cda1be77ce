"""The paged KV pool and its block allocator.

`KVCache` is one preallocated tensor [layers, 2, blocks, block_size, kv_heads,
head_dim]; each layer's K and V are views of it. On CPU it lives in shared
memory (`share_memory_()`), so another process (semi-PD's workers) can map the
same pages; on CUDA it can be shared by IPC handle.

`BlockPool` hands out block ids. It is plain bookkeeping, kept apart from the
tensor so the allocator can have exactly one owner while several workers read
and write the blocks it handed out.
"""

from __future__ import annotations

import math
from collections import deque

import torch

from semipd_engine.model.spec import ModelSpec


class KVCache:
    def __init__(self, spec: ModelSpec, num_blocks: int, block_size: int, dtype: torch.dtype,
                 device: str = "cpu", share: bool = True):
        self.num_blocks, self.block_size = num_blocks, block_size
        shape = (spec.num_layers, 2, num_blocks, block_size, spec.num_kv_heads, spec.head_dim)
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
    """Free-list allocator over block ids with an admission watermark."""

    def __init__(self, num_blocks: int, block_size: int, watermark: float = 0.0):
        self.num_blocks, self.block_size = num_blocks, block_size
        self.watermark_blocks = int(watermark * num_blocks)
        self._free: deque[int] = deque(range(num_blocks))
        self._used = bytearray(num_blocks)  # catches double frees and double allocations

    @property
    def num_free(self) -> int:
        return len(self._free)

    @property
    def num_used(self) -> int:
        return self.num_blocks - len(self._free)

    def blocks_needed(self, num_tokens: int, have: int) -> int:
        return max(0, math.ceil(num_tokens / self.block_size) - have)

    def can_allocate(self, n: int, admission: bool = False) -> bool:
        reserve = self.watermark_blocks if admission else 0
        return n <= self.num_free - reserve

    def allocate(self, n: int) -> list[int]:
        if n > len(self._free):
            raise MemoryError(f"asked for {n} KV blocks, {len(self._free)} free")
        out = [self._free.popleft() for _ in range(n)]
        for b in out:
            assert not self._used[b], f"block {b} allocated twice"
            self._used[b] = 1
        return out

    def free(self, blocks: list[int]) -> None:
        for b in blocks:
            if not self._used[b]:
                raise RuntimeError(f"block {b} freed twice")
            self._used[b] = 0
            self._free.append(b)
