"""KV transfer between instances that own separate pools (the disaggregated baseline).

Split in two, so the simulator can reuse the policy and charge bytes over a link
instead of copying:
- the policy, `TransferQueue`: first come first served; a transfer starts only
  when the receiving pool has the blocks, so a full decode pool back-pressures
  the prefill side (which keeps holding the source blocks) instead of dropping anything;
- the mechanism, a `copy(transfer, dst_blocks) -> (bytes, seconds)` callable:
  `TensorBlockCopy` below copies real bytes. On CPU every instance's pool lives in
  shared memory, so a decode instance maps the prefill pools and copies a
  request's blocks into blocks it allocated in its own pool: one real copy of
  every byte, the same-node analogue of a CUDA-IPC peer copy.
The source blocks stay allocated until the receiver has its copy and says `ReleaseKV`.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

from semipd_engine.core import block_pool
from semipd_engine.core.block_pool import BlockPool, cache_blocks, cached_prefix
from semipd_engine.core.request import Request


@dataclass
class Transfer:
    request: Request
    source: str  # the prefill instance holding the blocks
    src_blocks: list[int]


CopyFn = Callable[[Transfer, list[int]], tuple[int, float]]


class TransferQueue:
    """Pulls offered transfers into this instance's pool, first come first served."""

    def __init__(self, pool: BlockPool, copy: CopyFn):
        self.pool, self.copy = pool, copy
        self.pending: deque[Transfer] = deque()

    def offer(self, req: Request, source: str) -> None:
        self.pending.append(Transfer(req, source, list(req.block_table)))

    def drop(self, request_id: str) -> Transfer | None:
        for t in self.pending:
            if t.request.request_id == request_id:
                self.pending.remove(t)
                return t
        return None

    def pull(self) -> list[tuple[Transfer, int, float, int]]:
        """Move every pending transfer that fits, in order; returns (transfer, bytes, seconds, blocks not copied)
        for each. With a prefix cache here, a request's leading full blocks that this pool holds cached (a
        conversation's earlier turn, its answer included) are shared, not copied; the full blocks it receives
        join the cache, where a later transfer can find them."""
        done = []
        pool = self.pool
        while self.pending:
            t = self.pending[0]
            req = t.request
            full = min(len(t.src_blocks), req.num_computed_tokens // pool.block_size) if pool.prefix_caching else 0
            if full and block_pool.private_blocks(req):  # nothing here to find, nobody to look: registered as it leaves
                full = req.num_registered_blocks = 0
            hit = cached_prefix(pool, req, full) if full else []
            dst = pool.try_allocate(len(t.src_blocks) - len(hit), hit=hit)
            if dst is None:
                break  # back-pressure: the head of the queue waits for room, and so does everything behind it
            nbytes, seconds = self.copy(Transfer(req, t.source, t.src_blocks[len(hit):]) if hit else t, dst)
            req.block_table = [b for b, _ in hit] + dst
            if full:
                cache_blocks(pool, req, len(hit), full)
                req.num_registered_blocks = full  # this pool's count from here on (the sender's was its own)
            self.pending.popleft()
            done.append((t, nbytes, seconds, len(hit)))
        return done


class TensorBlockCopy:
    """The real mechanism: one indexed copy moves K and V of every layer of a request's blocks."""

    def __init__(self, sources: dict, kv):
        self.sources, self.kv = sources, kv  # name -> KVCache of each prefill instance; this instance's KVCache
        self.block_bytes = kv.data[:, :, 0].numel() * kv.data.element_size()

    def __call__(self, t: Transfer, dst: list[int]) -> tuple[int, float]:
        import torch

        if not dst:  # every block was cached here
            return 0, 0.0
        t0 = time.perf_counter()
        dev = self.kv.data.device
        src = self.sources[t.source].data
        # [layers, 2, blocks, ...]: index along the block axis.
        self.kv.data.index_copy_(2, torch.tensor(dst, device=dev),
                                 src.index_select(2, torch.tensor(t.src_blocks, device=dev)))
        if self.kv.data.is_cuda:
            torch.cuda.current_stream().synchronize()
        return len(dst) * self.block_bytes, time.perf_counter() - t0
