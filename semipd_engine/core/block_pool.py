"""The KV block allocator: plain bookkeeping of block ids, no tensors.

It is kept apart from the KV tensor (semipd_engine.runtime.kv_cache) so the policies and
the simulator can allocate without torch, and so one allocator can have exactly
one owner while several workers read and write the blocks it handed out.
`SharedBlockPool` (kv_cache.py) keeps the same state in shared memory for the
multi-process engines.
"""

from __future__ import annotations


class BlockPool:
    """Block-id allocator with an admission watermark: new prompts may not eat the last
    `watermark` of the pool, which running decodes need to grow."""

    def __init__(self, num_blocks: int, block_size: int, watermark: float = 0.0):
        if num_blocks < 1 or block_size < 1:
            raise ValueError(f"a block pool needs num_blocks >= 1 and block_size >= 1, got {num_blocks}, {block_size}")
        self.num_blocks, self.block_size = num_blocks, block_size
        self.watermark_blocks = int(watermark * num_blocks)
        self._free = list(range(num_blocks - 1, -1, -1))  # a stack: pops 0, 1, 2, ...
        self._used = bytearray(num_blocks)

    @property
    def num_free(self) -> int:
        return len(self._free)

    @property
    def num_used(self) -> int:
        return self.num_blocks - self.num_free

    def blocks_needed(self, num_tokens: int, have: int) -> int:
        return max(0, -(-num_tokens // self.block_size) - have)

    def try_allocate(self, n: int, admission: bool = False) -> list[int] | None:
        """Take `n` blocks, or None when they are not there (behind the watermark for admissions)."""
        reserve = self.watermark_blocks if admission else 0
        if n > len(self._free) - reserve:
            return None
        ids = [self._free.pop() for _ in range(n)]
        for b in ids:
            if self._used[b]:
                raise RuntimeError(f"allocator corrupted: free block {b} is marked used")
            self._used[b] = 1
        return ids

    def free(self, blocks: list[int]) -> None:
        if len(set(blocks)) != len(blocks) or not all(self._used[b] for b in blocks):
            raise RuntimeError(f"KV block freed twice among {blocks}")
        for b in blocks:
            self._used[b] = 0
        self._free.extend(reversed(blocks))
