"""Decoding requests kept as one group, so that a decode iteration costs the same for 2 requests or 250.

In a decode iteration every running decode computes one token and samples one: the same step, once per
request. A model runner needs each request's row, so the worker processes keep them one by one; the
simulator (the only user: `Scheduler.enable_decode_group`) knows what every member will do and when:
- a member's outputs, token times and computed tokens are its state when it joined plus one token per group
  iteration since (`gen`), the iterations' end times kept once for all (`ends`); they are materialised when
  something reads them: it leaves (its last token, an abort, the group dissolved) or registers a block;
- a member needs a new block every `block_size` iterations, at a phase fixed when it joins: members wait in
  one bucket per phase, and iteration i reserves one block for each member of bucket i % block_size;
- a block it filled joins the prefix cache after the iteration that computed its last token (a heap by
  iteration) where another request could look it up meanwhile: its tokens are real. The simulator's
  placeholder tokens hash by the request's own salt, which no other request has, so until the request leaves
  (or is preempted, and looks up its own blocks again) nobody can tell when they were registered; they are
  registered when it leaves;
- its last token is at an iteration known when it joins (a heap by iteration);
- the cost model reads the running sums, members and their context tokens (`n`, `ctx`).
The scheduler handles these in the order its per-request loops would (running order: `run_seq`), so the pool,
the prefix cache and every token time are what the per-request loops give (tests compare them).
"""

from __future__ import annotations

import heapq
from dataclasses import dataclass

from semipd_engine.core.request import Request


@dataclass(slots=True, eq=False)
class Member:
    req: Request
    base: int  # the group iteration its materialised state is at
    end: int  # the group iteration that samples its last token
    seq: int  # its place in the running list (`Request.run_seq`)
    bucket: int  # the phase (iteration % block_size) of its block reservations, -1 if it needs none


class DecodeGroup:
    def __init__(self, token: int, block_size: int, prefix_caching: bool):
        self.token, self.bs, self.prefix_caching = token, block_size, prefix_caching
        self.gen = 0  # group iterations completed
        self.ends: list[float] = []  # their end times
        self.members: dict[Request, Member] = {}
        self.ctx = 0  # sum over members of the tokens the next iteration attends (computed + 1)
        # Members by reservation phase, as their requests (what `reservations` hands out, gathered in C).
        self.buckets: list[dict[Request, None]] = [{} for _ in range(block_size)]
        # (iteration, seq, member): a block registered after it (real tokens only), its last token
        self.registers: list[tuple[int, int, Member]] = []
        self.finishes: list[tuple[int, int, Member]] = []
        # Decodes the group has not taken in yet (just prefilled, adopted), checked when the next batch is made.
        self.pending: list[Request] = []

    @property
    def n(self) -> int:
        return len(self.members)

    @staticmethod
    def eligible(req: Request) -> bool:
        """Only a request whose tokens cannot end it early (no end-of-sequence check) has a known last token."""
        return req.params.ignore_eos

    def join(self, req: Request, max_len: int) -> None:
        """`req` decodes from iteration `gen` on, its block for that iteration's token already reserved."""
        n_tok, n_out = req.num_tokens, len(req.output_token_ids)
        g, bs = self.gen, self.bs
        # Iteration g + j computes token n_tok + j - 1 and samples output n_out + j + 1.
        last = max(0, min(req.params.max_tokens - n_out, max_len - len(req.prompt_token_ids) - n_out) - 1)
        reserve = g + len(req.block_table) * bs - n_tok + 1  # the first iteration whose token needs a new block
        m = Member(req, g, g + last, req.run_seq, reserve % bs if reserve <= g + last else -1)
        self.members[req] = m
        self.ctx += n_tok
        heapq.heappush(self.finishes, (m.end, m.seq, m))
        if m.bucket >= 0:
            self.buckets[m.bucket][req] = None
        if self.prefix_caching and not req.placeholder_tokens:
            self._push_register(m)

    def materialise(self, m: Member) -> Request:
        req, k = m.req, self.gen - m.base
        if k:
            req.output_token_ids.extend([self.token] * k)
            req.times.tokens.extend(self.ends[m.base:self.gen])
            req.num_computed_tokens += k
            m.base = self.gen
        return req

    def leave(self, req: Request) -> bool:
        """Take `req` out, its state materialised; False if it was not a member."""
        m = self.members.pop(req, None)
        if m is None:
            return False
        self.materialise(m)
        if m.bucket >= 0:
            del self.buckets[m.bucket][req]
        self.ctx -= req.num_computed_tokens + 1
        return True

    def dissolve(self) -> list[Request]:
        """Every member back to a plain running request (the scheduler's per-request loops take over); returns
        them, materialised."""
        out = [self.materialise(m) for m in self.members.values()]
        self.members.clear()
        for b in self.buckets:
            b.clear()
        self.registers.clear()
        self.finishes.clear()
        self.pending.clear()
        self.ctx = 0
        return out

    def advance(self, now: float, iterations: int = 1, ends: list[float] | None = None) -> None:
        """`iterations` group iterations ended (at `now`, or at `ends`)."""
        self.ends.extend(ends) if ends is not None else self.ends.append(now)
        self.ctx += self.n * iterations
        self.gen += iterations

    # -- what falls due -----------------------------------------------------------------------
    def reservations(self, at: int) -> list[Request]:
        """The members that need one more block for iteration `at` (each exactly one)."""
        return list(self.buckets[at % self.bs])

    def registrations(self, after: int) -> list[Request]:
        """Members with real tokens that filled a block in iteration `after` (or, after a fast-forward to it, in
        any iteration up to it: nobody looked the cache up meanwhile, so registering them all at its end is what
        registering each in turn gives), materialised, the next one scheduled (`registered`)."""
        heap, out = self.registers, []
        while heap and heap[0][0] <= after:
            m = heapq.heappop(heap)[2]
            if self.members.get(m.req) is m:
                out.append(self.materialise(m))
        return out

    def registered(self, req: Request) -> None:
        self._push_register(self.members[req])

    def _push_register(self, m: Member) -> None:
        req = m.req  # its computed tokens are those after iteration gen - 1 (materialised at gen)
        at = self.gen - 1 + (req.num_registered_blocks + 1) * self.bs - req.num_computed_tokens - (self.gen - m.base)
        if at <= m.end:
            heapq.heappush(self.registers, (at, m.seq, m))

    def finishing(self, after: int) -> list[Request]:
        """Members whose last token iteration `after` sampled, in running order, taken out and materialised."""
        fin, out = self.finishes, []
        while fin and fin[0][0] <= after:
            a, _, m = heapq.heappop(fin)
            if self.members.get(m.req) is m:
                if a != after:
                    raise RuntimeError(f"decode group: a finish at iteration {a} was missed (now {after})")
                self.leave(m.req)
                out.append(m.req)
        return out

    def next_finish(self) -> int:
        """The first group iteration a member finishes in (members exist)."""
        fin = self.finishes
        while self.members.get(fin[0][2].req) is not fin[0][2]:
            heapq.heappop(fin)
        return fin[0][0]
