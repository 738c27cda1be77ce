"""One scheduler, several policies: what to run in the next iteration.

- `prefill_priority` (vLLM default): new prompts first, whole, up to the token
  budget; a prefill iteration runs no decodes; otherwise decode every running request.
- `chunked` (Sarathi-Serve stall-free batching): every running decode first,
  then chunks of partly prefilled prompts, then new prompts, up to the budget.
- `prefill_only` / `decode_only`: the two halves, for engines whose phases run
  in separate workers (semi-PD, disaggregated).

Blocks for a whole prompt are taken at admission (behind the watermark); a
decode takes one block when it crosses a block boundary. When a decode cannot
get one, the newest running request is preempted by recompute: its blocks are
freed and it goes back to the front of the waiting queue, keeping its outputs.
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field

from semipd_engine.kv_cache import BlockPool
from semipd_engine.request import Request, RequestStatus

POLICIES = ("prefill_priority", "chunked", "prefill_only", "decode_only")


@dataclass
class ScheduledBatch:
    items: list[tuple[Request, int]] = field(default_factory=list)  # (request, new tokens)
    preempted: list[Request] = field(default_factory=list)

    @property
    def num_tokens(self) -> int:
        return sum(n for _, n in self.items)

    @property
    def num_prefill_tokens(self) -> int:
        return sum(n for r, n in self.items if not r.in_decode)

    def __bool__(self) -> bool:
        return bool(self.items)


class Scheduler:
    def __init__(self, pool: BlockPool, policy: str, max_num_seqs: int, max_num_batched_tokens: int):
        if policy not in POLICIES:
            raise ValueError(f"engine.policy must be one of {POLICIES}, got {policy!r}")
        self.pool, self.policy = pool, policy
        self.max_num_seqs, self.budget = max_num_seqs, max_num_batched_tokens
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self.num_preemptions = 0

    # -- queue management -------------------------------------------------
    def add(self, req: Request) -> None:
        req.status = RequestStatus.WAITING
        self.waiting.append(req)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def finish(self, req: Request) -> None:
        """Drop a request (finished, aborted or handed off) and free its blocks."""
        if req in self.running:
            self.running.remove(req)
        elif req in self.waiting:
            self.waiting.remove(req)
        self.release(req)

    def release(self, req: Request) -> None:
        if req.block_table:
            self.pool.free(req.block_table)
            req.block_table = []

    # -- policies ---------------------------------------------------------
    def schedule(self) -> ScheduledBatch:
        batch = ScheduledBatch()
        if self.policy == "prefill_priority":
            self._admit(batch, self.budget, chunk=False)
            if not batch:
                self._decodes(batch)
        elif self.policy == "chunked":
            budget = self.budget - self._decodes(batch)
            budget = self._continue_prefills(batch, budget)
            self._admit(batch, budget, chunk=True)
        elif self.policy == "prefill_only":
            budget = self._continue_prefills(batch, self.budget)
            self._admit(batch, budget, chunk=True)
        else:
            self._decodes(batch)
        now = time.monotonic()
        for req, _ in batch.items:
            if req.times.first_scheduled is None:
                req.times.first_scheduled = now
        return batch

    def _decodes(self, batch: ScheduledBatch) -> int:
        """Schedule every running decode (oldest first), preempting the newest on OOM."""
        scheduled = 0
        i = 0
        while i < len(self.running):
            req = self.running[i]
            if not req.in_decode:
                i += 1
                continue
            while not self._reserve(req, req.num_tokens):
                victim = self.running[-1]
                self._preempt(victim, batch)
                if victim is req:
                    break
            else:
                batch.items.append((req, 1))
                scheduled += 1
                i += 1
        return scheduled

    def _continue_prefills(self, batch: ScheduledBatch, budget: int) -> int:
        for req in self.running:
            if budget <= 0:
                break
            if not req.in_decode and req.num_remaining > 0:
                n = min(req.num_remaining, budget)
                batch.items.append((req, n))
                budget -= n
        return budget

    def _admit(self, batch: ScheduledBatch, budget: int, chunk: bool) -> None:
        while self.waiting and len(self.running) < self.max_num_seqs:
            req = self.waiting[0]
            n = req.num_remaining
            if chunk:
                if budget <= 0:
                    break
                n = min(n, budget)
            elif n > budget and batch.items:
                break  # a lone prompt over the budget still runs, alone
            got = self.pool.try_allocate(self.pool.blocks_needed(req.num_tokens, len(req.block_table)),
                                         admission=True)
            if got is None:
                break
            req.block_table += got
            self.waiting.popleft()
            req.status = RequestStatus.RUNNING
            self.running.append(req)
            batch.items.append((req, n))
            budget -= n

    def _reserve(self, req: Request, num_tokens: int) -> bool:
        got = self.pool.try_allocate(self.pool.blocks_needed(num_tokens, len(req.block_table)))
        if got is None:
            return False
        req.block_table += got
        return True

    def _preempt(self, req: Request, batch: ScheduledBatch) -> None:
        self.running.remove(req)
        batch.items = [(r, n) for r, n in batch.items if r is not req]
        self.release(req)
        req.num_computed_tokens = 0
        req.status = RequestStatus.WAITING
        req.times.preemptions.append(time.monotonic())
        self.waiting.appendleft(req)
        batch.preempted.append(req)
        self.num_preemptions += 1
