"""KV transfer between instances that own separate pools (the disaggregated baseline).

On CPU every instance's pool lives in shared memory, so a decode instance maps the
prefill instances' pools and copies a request's blocks into blocks it allocated
in its own pool: one real copy of every byte, the same-node analogue of a
CUDA-IPC peer copy. The source blocks stay allocated until the receiver says
`release`, so a full decode pool back-pressures the prefill side instead of
dropping anything.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from semipd_engine.kv_cache import BlockPool, KVCache
from semipd_engine.request import Request


@dataclass
class Transfer:
    request: Request
    source: str  # the prefill instance holding the blocks
    src_blocks: list[int]


class KVReceiver:
    """Pulls transfers into this instance's pool, first come first served."""

    def __init__(self, sources: dict[str, KVCache], kv: KVCache, pool: BlockPool):
        self.sources, self.kv, self.pool = sources, kv, pool
        self.pending: list[Transfer] = []

    def offer(self, req: Request, source: str) -> None:
        self.pending.append(Transfer(req, source, list(req.block_table)))

    def drop(self, request_id: str) -> Transfer | None:
        for i, t in enumerate(self.pending):
            if t.request.request_id == request_id:
                return self.pending.pop(i)
        return None

    def pull(self) -> list[tuple[Transfer, int, float]]:
        """Copy every pending transfer that fits; returns (transfer, bytes, seconds) for each done."""
        done = []
        while self.pending:
            t = self.pending[0]
            n = len(t.src_blocks)
            dst = self.pool.try_allocate(n)
            if dst is None:
                break  # back-pressure: the prefill side keeps holding the blocks
            t0 = time.perf_counter()
            src_ids = torch.tensor(t.src_blocks, device=self.kv.data.device)
            dst_ids = torch.tensor(dst, device=self.kv.data.device)
            src = self.sources[t.source].data
            # [layers, 2, blocks, ...]: one indexed copy moves K and V of every layer.
            self.kv.data.index_copy_(2, dst_ids, src.index_select(2, src_ids))
            if self.kv.data.is_cuda:
                torch.cuda.current_stream().synchronize()
            seconds = time.perf_counter() - t0
            nbytes = n * self.kv.data[:, :, 0].numel() * self.kv.data.element_size()
            t.request.block_table = dst
            self.pending.pop(0)
            done.append((t, nbytes, seconds))
        return done
