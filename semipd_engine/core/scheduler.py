"""The scheduler: what to run next, and what a finished iteration means for each request.

One iteration of any engine is

    batch = scheduler.schedule(now)          # policy: which requests, how many new tokens each
    result = executor.execute(batch)         # model runner (real) or cost model (simulated)
    outcome = scheduler.update(batch, result, now)

`Scheduler` holds what every policy shares: the waiting queue, the running
list, admission against the block pool (blocks for a whole prompt at once,
behind the watermark), decode block reservation with preemption by recompute
(the newest running request is freed and goes back to the *front* of the
waiting queue, keeping its outputs), and postprocessing (append the sampled
token, detect the finish, free blocks). The policies (semipd_engine.core.policies)
only choose the batch and say where a request goes after its iteration.

Nothing here imports torch or reads a clock of its own: times are passed in,
so the same objects run in worker processes and in the simulator.
"""

from __future__ import annotations

import bisect
import itertools
from collections import deque
from dataclasses import dataclass, field
from operator import attrgetter
from typing import NamedTuple, Optional

from semipd_engine.core import block_pool
from semipd_engine.core.block_pool import BlockPool, cached_prefix, free_request, register_computed
from semipd_engine.core.decode_group import DecodeGroup
from semipd_engine.core.request import FinishReason, Request, RequestOutput, RequestStatus

_RUN_SEQ = attrgetter("run_seq")


@dataclass
class ScheduledBatch:
    items: list[tuple[Request, int]] = field(default_factory=list)  # (request, new tokens)
    preempted: list[Request] = field(default_factory=list)
    # The decode group's members (the simulator's: semipd_engine.core.decode_group), one new token each, and
    # the context tokens they attend; not in `items`.
    group: int = 0
    group_ctx: int = 0

    @property
    def num_tokens(self) -> int:
        return sum(n for _, n in self.items) + self.group

    @property
    def num_prefill_tokens(self) -> int:
        return sum(n for r, n in self.items if not r.in_decode)

    def __bool__(self) -> bool:
        return bool(self.items) or self.group > 0


class ExecuteResult(NamedTuple):
    """What an executor returns: the token sampled for each request that reached its end, and how long it took.
    (A named tuple, as the simulator's `Work` and `BatchShape`: built every iteration, ~30% cheaper than a frozen
    dataclass.)"""

    sampled: list[tuple[Request, int]]
    duration_s: float


EMPTY_RESULT = ExecuteResult([], 0.0)


@dataclass
class StepOutcome:
    """What one iteration produced, for whoever drives the scheduler (worker loop or simulator)."""

    outputs: list[RequestOutput] = field(default_factory=list)
    finished: list[Request] = field(default_factory=list)
    # Phase-split engines: prefilled requests leave for a decode worker with their blocks (`handoffs`);
    # requests a decode worker preempted go back to a prefill worker for recompute (`evicted`).
    handoffs: list[Request] = field(default_factory=list)
    evicted: list[Request] = field(default_factory=list)
    num_prefill_tokens: int = 0
    num_decode_tokens: int = 0
    duration_s: float = 0.0

    @property
    def phase(self) -> str:
        if self.num_prefill_tokens and self.num_decode_tokens:
            return "mixed"
        return "prefill" if self.num_prefill_tokens else "decode"

    @property
    def ran(self) -> bool:
        return bool(self.num_prefill_tokens or self.num_decode_tokens)


@dataclass(frozen=True)
class SchedulerState:
    """A scheduler's requests and counters, to continue in another process (a worker replaced to change its MPS
    share): the requests keep their blocks, which live in the shared pool, and their order."""

    waiting: tuple[Request, ...]
    running: tuple[Request, ...]
    parked: tuple[Request, ...]
    num_preemptions: int
    prefix_queries: int
    prefix_hits: int


class Scheduler:
    """Queues, admission, preemption and postprocessing; subclasses are the policies."""

    name = "base"
    runs_prefill = True  # can this policy compute prompts (or must preempted requests leave)?
    hands_off = False  # does a request leave after its first token (a prefill-only worker)?
    # Per-token outputs stream to clients; the simulator reads requests' own timestamps and turns them off.
    emit_outputs = True

    def __init__(self, pool: BlockPool, max_num_seqs: int, max_num_batched_tokens: int, max_model_len: int):
        self.pool = pool
        self.max_num_seqs, self.budget, self.max_model_len = max_num_seqs, max_num_batched_tokens, max_model_len
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        # Adopted (prefilled elsewhere) while `max_num_seqs` are running: they hold their blocks and wait here.
        self.parked: deque[Request] = deque()
        self.requests: dict[str, Request] = {}
        self.num_preemptions = 0
        # Prefix cache lookups at admission, in tokens (vLLM's prefix_cache_queries / prefix_cache_hits).
        self.prefix_queries = self.prefix_hits = 0
        self.group: Optional[DecodeGroup] = None
        self._run_seq = itertools.count(1)

    def enable_decode_group(self, token: int) -> None:
        """Keep decoding requests as one group (semipd_engine.core.decode_group), every sampled token `token`: for
        a driver that reads results off the requests when they finish (the simulator), not per iteration."""
        if self.emit_outputs or type(self)._after_token is not Scheduler._after_token:
            raise ValueError(f"{self.name}: a decode group needs emit_outputs off and requests that keep decoding")
        self.group = DecodeGroup(token, self.pool.block_size, self.pool.prefix_caching)

    def _run(self, req: Request) -> None:
        req.run_seq = next(self._run_seq)
        self.running.append(req)

    def _unrun(self, req: Request) -> bool:
        """Take `req` out of `running`; False if it is not there. `running` is in `run_seq` order (`_run` appends,
        nothing else inserts): a bisection finds it without comparing it with every request before it."""
        running = self.running
        i = bisect.bisect_left(running, req.run_seq, key=_RUN_SEQ)
        if i < len(running) and running[i] is req:
            del running[i]
            return True
        return False

    def _unpark(self) -> None:
        """A slot freed: the oldest adopted request joins the running ones."""
        req = self.parked.popleft()
        self._run(req)
        if self.group is not None:
            self.group.pending.append(req)

    # -- requests in and out ------------------------------------------------------------------
    def add(self, req: Request) -> None:
        """A request to prefill (new, or preempted elsewhere and sent back for recompute)."""
        req.status = RequestStatus.WAITING
        self.requests[req.request_id] = req
        self.waiting.append(req) if not req.times.preemptions else self.waiting.appendleft(req)

    def adopt(self, req: Request) -> None:
        """Take over a request prefilled elsewhere: its KV blocks are already in this worker's pool."""
        req.status = RequestStatus.RUNNING
        self.requests[req.request_id] = req
        if len(self.running) < self.max_num_seqs:
            self._run(req)
            if self.group is not None:
                self.group.pending.append(req)
        else:
            self.parked.append(req)

    def abort(self, request_id: str) -> bool:
        req = self.requests.get(request_id)
        if req is None:
            return False
        self._drop(req, done=True)
        req.status, req.finish_reason = RequestStatus.FINISHED, FinishReason.ABORT
        return True

    def fail(self, req: Request, error: str, now: float) -> RequestOutput:
        """A request the executor could not run: forget it, free its blocks, and say why."""
        if self.requests.get(req.request_id) is req:
            self._drop(req)
        req.status, req.finish_reason = RequestStatus.FINISHED, FinishReason.ERROR
        req.times.finished = now
        return make_output(req, (), (), error=error)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running or self.parked)

    def _drop(self, req: Request, free: bool = True, done: bool = False) -> None:
        """Forget a request (finished, aborted, handed off or evicted); free its blocks unless they travel. A
        request `done` for good whose blocks nobody can look up (`block_pool.private_blocks`) retires them,
        unregistered."""
        g = self.group
        retire = done and free and self.pool.prefix_caching and block_pool.private_blocks(req)
        if g is not None:
            if g.leave(req):
                if self.pool.prefix_caching and not retire:
                    self._register(req)
            elif req in g.pending:
                g.pending.remove(req)
        if req.status is not RequestStatus.RUNNING:
            self.waiting.remove(req)
        else:
            if not self._unrun(req):  # running first: a saturated decode worker's parked queue is long
                self.parked.remove(req)
        self.requests.pop(req.request_id, None)
        if free and req.block_table:
            if retire:  # the blocks `_register` would have registered by now: every one its computed tokens fill
                self.pool.retire(req.block_table,
                                 min(req.num_computed_tokens // self.pool.block_size, len(req.block_table)),
                                 hashed=req.num_registered_blocks > 0)
                req.block_table = []
            else:
                free_request(self.pool, req)

    def snapshot(self) -> SchedulerState:
        """Everything a successor needs to go on where this scheduler stops (between iterations)."""
        if self.group is not None:
            raise ValueError("a decode group's tokens are not materialised: snapshot a scheduler without one")
        return SchedulerState(tuple(self.waiting), tuple(self.running), tuple(self.parked), self.num_preemptions,
                              self.prefix_queries, self.prefix_hits)

    def restore(self, state: SchedulerState) -> None:
        """Continue from a predecessor's `snapshot` (this scheduler is new: nothing queued yet)."""
        if self.has_work():
            raise ValueError("restore into a scheduler that already holds requests")
        for req in state.running:  # in their order: preemption still picks the newest
            self.requests[req.request_id] = req
            self._run(req)
        for req in state.parked:
            self.requests[req.request_id] = req
            self.parked.append(req)
        for req in state.waiting:
            self.requests[req.request_id] = req
            self.waiting.append(req)
        self.num_preemptions = state.num_preemptions
        self.prefix_queries, self.prefix_hits = state.prefix_queries, state.prefix_hits

    # -- the policy ----------------------------------------------------------------------------
    def schedule(self, now: float) -> ScheduledBatch:
        batch = ScheduledBatch()
        self._fill(batch, now)
        for req, _ in batch.items:
            if req.times.first_scheduled is None:
                req.times.first_scheduled = now
        return batch

    def _fill(self, batch: ScheduledBatch, now: float) -> None:
        raise NotImplementedError

    def update(self, batch: ScheduledBatch, result: ExecuteResult, now: float) -> StepOutcome:
        """Postprocess one iteration: count computed tokens, append sampled ones, route finished requests."""
        out = StepOutcome(duration_s=result.duration_s)
        g = self.group if batch.group else None
        if g is not None:  # the members' tokens: one group iteration more, and what falls due at it
            it = g.gen
            g.advance(now)
            for req in g.registrations(it):
                self._register(req)
                g.registered(req)
        decode = prefill = 0
        # Blocks filled with computed tokens join the prefix cache as the request's count passes their end.
        full = self.pool.block_size if self.pool.prefix_caching else 0
        for req, n in batch.items:
            # req.in_decode, inline (this loop runs for every request of every iteration)
            c = req.num_computed_tokens
            if n == 1 and req.output_token_ids and len(req.prompt_token_ids) + len(req.output_token_ids) - c == 1:
                decode += 1
            else:
                prefill += n
            req.num_computed_tokens = c = c + n
            if full and c >= (req.num_registered_blocks + 1) * full and not block_pool.private_blocks(req):
                self._register(req)
        if g is not None:  # they come first in the batch: their last tokens before the other requests' tokens
            decode += batch.group
            out.finished += self.group_finish(now)
        out.num_decode_tokens, out.num_prefill_tokens = decode, prefill
        max_len, emit = self.max_model_len, self.emit_outputs
        after = None if type(self)._after_token is Scheduler._after_token else self._after_token
        for req, token in result.sampled:
            # Append the sampled token, then the finish rule (end of sequence unless ignored, max_tokens, the
            # context limit); inline, as this loop runs for every request of every iteration.
            outs, times, params = req.output_token_ids, req.times, req.params
            outs.append(token)
            if times.first_token is None:
                times.first_token = now
            times.tokens.append(now)
            if not params.ignore_eos and token in req.eos_token_ids:
                reason = FinishReason.STOP
            elif len(outs) >= params.max_tokens or len(req.prompt_token_ids) + len(outs) >= max_len:
                reason = FinishReason.LENGTH
            else:
                reason = None
            if reason is not None:
                self.finish(req, reason, now)
                out.finished.append(req)
            elif after is not None:
                after(req, out)
            if emit:
                out.outputs.append(make_output(req, (token,), (now,)))
        if not self.runs_prefill:
            self._evict_waiting(out)
        if self.group is not None:  # requests that decode from the next iteration on: the group takes them in then
            pending, requests = self.group.pending, self.requests
            for req, _ in batch.items:
                if req.status is RequestStatus.RUNNING and req.in_decode and requests.get(req.request_id) is req:
                    pending.append(req)
        return out

    def finish(self, req: Request, reason: FinishReason, now: float) -> None:
        """`req` is done (its end of sequence, its length, or an abort by the policy): forget it, free its blocks."""
        self._drop(req, done=True)
        req.status, req.finish_reason = RequestStatus.FINISHED, reason
        req.times.finished = now

    def _after_token(self, req: Request, out: StepOutcome) -> None:
        """Where an unfinished request goes after a token; by default it keeps decoding here."""

    def register(self, batch: ScheduledBatch) -> None:
        """Blocks the batch's requests filled with computed tokens join the prefix cache (after an iteration, or
        after the simulator's fast-forward applied several)."""
        bs = self.pool.block_size
        for req, _ in batch.items:
            # else no block boundary crossed, or a private request's (registered as it leaves)
            if req.num_computed_tokens >= (req.num_registered_blocks + 1) * bs and not block_pool.private_blocks(req):
                self._register(req)

    def _register(self, req: Request) -> None:
        register_computed(self.pool, req)

    def _evict_waiting(self, out: StepOutcome) -> None:
        # A worker that cannot prefill sends preempted requests back for recompute.
        for req in list(self.waiting):
            self._drop(req)
            out.evicted.append(req)

    # -- building blocks of the policies -------------------------------------------------------
    def _decodes(self, batch: ScheduledBatch, now: float) -> int:
        """Schedule every running decode (oldest first), preempting the newest on OOM."""
        if self.group is not None and self._group_decodes(batch, now):
            return batch.group
        scheduled = 0
        bs = self.pool.block_size
        running = self.running
        append = batch.items.append
        # The common case first: nothing to preempt. A request whose next block cannot be reserved hands over to
        # the loop below, which preempts from the back of `running` (and so has to re-read its length).
        i = 0
        for req in running:
            out = req.output_token_ids
            n = len(req.prompt_token_ids) + len(out)
            if not out or n - req.num_computed_tokens != 1:  # not decoding (a prompt or chunk)
                i += 1
                continue
            if (n + bs - 1) // bs > len(req.block_table) and not self._reserve(req, n):
                break
            append((req, 1))
            scheduled += 1
            i += 1
        while i < len(running):
            req = running[i]
            n = len(req.prompt_token_ids) + len(req.output_token_ids)
            if not req.output_token_ids or n - req.num_computed_tokens != 1:  # not decoding (a prompt or chunk)
                i += 1
                continue
            # The common case, inline: the next token's slot is in a block the request already holds.
            if (n + bs - 1) // bs > len(req.block_table):
                while not self._reserve(req, n):
                    victim = running[-1]
                    self._preempt(victim, batch, now)
                    if victim is req:
                        break
                else:
                    batch.items.append((req, 1))
                    scheduled += 1
                    i += 1
                continue
            batch.items.append((req, 1))
            scheduled += 1
            i += 1
        return scheduled

    def _group_decodes(self, batch: ScheduledBatch, now: float) -> bool:
        """Every running decode as the group: the blocks due now reserved, the new decodes taken in, the newest
        running requests preempted where the pool is short (as the per-request loop does). False (the group
        dissolved, the per-request loop to run) when a new decode cannot join."""
        g, pool = self.group, self.pool
        it = g.gen
        due, new = g.reservations(it), g.pending
        if not all(g.eligible(req) for req in new):
            self._dissolve_group()
            return False
        g.pending = []
        needs = [pool.blocks_needed(req.num_tokens, len(req.block_table)) for req in new]
        need = len(due) + sum(needs)
        if need <= pool.num_free:  # one allocation: which request gets which free block changes no count, no time
            if need:
                ids = iter(pool.try_allocate(need))
                for req, b in zip(due, ids):
                    req.block_table.append(b)
                for req, k in zip(new, needs):
                    if k:
                        req.block_table.extend(itertools.islice(ids, k))
        else:  # the per-request loop's order: oldest first, each preempting the newest until it has its block
            todo = sorted([(req.run_seq, req, 1) for req in due] + [(r.run_seq, r, k) for r, k in zip(new, needs)],
                          key=lambda e: e[0])
            for _, req, k in todo:
                while req.status is RequestStatus.RUNNING:
                    got = pool.try_allocate(k)
                    if got is not None:
                        req.block_table += got
                        break
                    victim = self.running[-1]
                    if g.leave(victim) and pool.prefix_caching:
                        self._register(victim)  # its filled blocks, as the per-request loop has them
                    self._preempt(victim, batch, now)
        for req in new:
            if req.status is RequestStatus.RUNNING:
                g.join(req, self.max_model_len)
        batch.group, batch.group_ctx = g.n, g.ctx
        return True

    def _dissolve_group(self) -> None:
        for req in self.group.dissolve():  # they join again after the per-request iteration
            if self.pool.prefix_caching:
                self._register(req)

    def group_run(self, ends: list[float], scheduled: bool = True) -> int:
        """The decode group runs the iterations that end at `ends`, none but the last a member's last (the
        simulator's fast-forward; the first already `scheduled`, or not: the group's next after a finish): the
        blocks they need are reserved, up to the first iteration the pool cannot give, the members advance, the
        blocks they filled are registered. Returns the iterations run; a member's last token ends the run
        (`group_finish`)."""
        g, pool = self.group, self.pool
        first, run, free, need = g.gen, len(ends), pool.num_free, 0
        start = 1 if scheduled else 0
        for j in range(start, run):
            need += len(g.buckets[(first + j) % g.bs])
            if need > free:
                run = j
                break
        if run == 0:
            return 0
        for j in range(start, run):
            due = g.reservations(first + j)
            if due:
                for req, b in zip(due, pool.try_allocate(len(due))):
                    req.block_table.append(b)
        g.advance(ends[run - 1], run, ends[:run])
        for req in g.registrations(g.gen - 1):
            self._register(req)
            g.registered(req)
        return run

    def group_finish(self, now: float) -> list[Request]:
        """The members whose last token the group's latest iteration sampled, finished (in running order)."""
        out = []
        for req in self.group.finishing(self.group.gen - 1):
            if self.pool.prefix_caching and not block_pool.private_blocks(req):
                self._register(req)
            self.finish(req, FinishReason.LENGTH, now)
            out.append(req)
        return out

    def _continue_prefills(self, batch: ScheduledBatch, budget: int, skip_decodes: bool = True) -> int:
        """Chunks of partly computed prompts. A recompute whose last chunk is one token looks like a decode:
        policies that schedule decodes themselves skip those (`skip_decodes`), a prefill-only one must not."""
        # A decode group's members are decoding: skipped at a dict lookup (a chunked policy's batch holds ~250).
        members = self.group.members if skip_decodes and self.group is not None else {}
        for req in self.running:
            if budget <= 0:
                break
            if req in members:
                continue
            if req.num_remaining > 0 and not (skip_decodes and req.in_decode):
                n = min(req.num_remaining, budget)
                batch.items.append((req, n))
                budget -= n
        return budget

    def _admit(self, batch: ScheduledBatch, budget: int, chunk: bool) -> None:
        pool = self.pool
        while self.waiting and len(self.running) < self.max_num_seqs:
            req = self.waiting[0]
            # A private request's blocks are in no pool (`block_pool.private_blocks`): nothing to look up.
            hit = (self._cached_prefix(req) if pool.prefix_caching and not req.block_table
                   and not block_pool.private_blocks(req) else ())
            n = req.num_remaining - len(hit) * pool.block_size
            if chunk:
                if budget <= 0:
                    break
                n = min(n, budget)
            elif n > budget and batch.items:
                break  # a lone prompt over the budget still runs, alone
            got = pool.try_allocate(pool.blocks_needed(req.num_tokens, len(req.block_table) + len(hit)),
                                    admission=True, hit=hit)
            if got is None:
                break
            if pool.prefix_caching and not req.block_table:
                cached = len(hit) * pool.block_size
                self.prefix_queries += req.num_tokens
                self.prefix_hits += cached
                req.block_table = [b for b, _ in hit]
                req.num_registered_blocks = len(hit)
                req.num_computed_tokens = cached
                if req.num_cached_tokens is None:
                    req.num_cached_tokens = cached
            req.block_table += got
            self.waiting.popleft()
            req.status = RequestStatus.RUNNING
            self._run(req)
            batch.items.append((req, n))
            budget -= n

    def _cached_prefix(self, req: Request) -> list[tuple[int, int]]:
        """The cached blocks of `req`'s prompt (and outputs, after a preemption), leaving at least its last token
        to compute: the iteration that computes it samples the next token."""
        return cached_prefix(self.pool, req, (req.num_tokens - 1) // self.pool.block_size)

    def _reserve(self, req: Request, num_tokens: int) -> bool:
        got = self.pool.try_allocate(self.pool.blocks_needed(num_tokens, len(req.block_table)))
        if got is None:
            return False
        req.block_table += got
        return True

    def _preempt(self, req: Request, batch: ScheduledBatch, now: float) -> None:
        if not self._unrun(req):
            raise ValueError(f"{self.name}: preempting {req.request_id}, which is not running")
        batch.items = [(r, n) for r, n in batch.items if r is not req]
        free_request(self.pool, req)
        req.num_computed_tokens = req.num_registered_blocks = 0
        req.status = RequestStatus.WAITING
        req.times.preemptions.append(now)
        self.waiting.appendleft(req)  # the front: a preempted request is not starved behind new ones
        batch.preempted.append(req)
        self.num_preemptions += 1


def make_output(req: Request, tokens: tuple[int, ...], times: tuple[float, ...],
                error: Optional[str] = None) -> RequestOutput:
    done = req.status is RequestStatus.FINISHED
    return RequestOutput(
        request_id=req.request_id, new_token_ids=tokens, token_times=times, finished=done,
        finish_reason=req.finish_reason.value if done and req.finish_reason else None,
        num_prompt_tokens=req.num_prompt_tokens, num_output_tokens=len(req.output_token_ids),
        first_scheduled=req.times.first_scheduled if done else None,
        preemptions=tuple(req.times.preemptions) if done else (), error=error,
        num_cached_tokens=req.num_cached_tokens or 0,
    )
