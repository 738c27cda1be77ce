"""The simulated engines: the real compositions, driven by events on one virtual clock.

Each simulated worker holds the *same* scheduler object a worker process runs
(a policy from `semipd_engine.core.policies`, over a `BlockPool`), and a
`CostModelExecutor` in place of the model runner. An iteration is the real
one split in two events: at its start `schedule(t)` and `execute` (which
predicts its duration d); at `t + d`, `update(batch, result, t + d)`. Between
the two, other workers run, requests arrive, KV transfers land, and the
partition can change, exactly as concurrent processes would interleave.

What the workers are and how requests move between them is the engine's
topology (semipd_engine/topology/graph.py; `build.simulate` makes the workers), and
nothing here names an engine:
- a prefilled request leaves through the worker's `Handoff` object, the class the
  worker processes use (`adopt`: the decode worker takes the blocks in place;
  `transfer`: the blocks go through its `TransferQueue`, FCFS with
  back-pressure). The messages they send are delivered in process, and this
  driver supplies the mechanism: a transfer charges bytes over the link instead
  of copying, and its release and adoption land when the link is done;
- a partitioned pair (semi-PD) has each worker's device time scaled by its
  compute share (`ShareModels`), its HBM-bound part stretched while both phases
  run, and an iteration in flight re-priced when the other phase starts or stops;
  host time (the serving stack's, `semipd_engine/sim/stack.py`) is not scaled;
- a controller is the real `ControlLoop`, closed every `control_window_s` of
  virtual time.

Fast-forward: a worker whose next iteration is decode-only, with nothing
waiting, would repeat the same decision until something changes (an arrival or
any other event, a finish, a block boundary). Those iterations are applied in
one step, with per-iteration durations from the cost model, so token times are
bit-identical to the step-by-step loop (a test checks it).
"""

from __future__ import annotations

import contextlib
import gc
import heapq
import itertools
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, Optional

from semipd_engine.core.block_pool import BlockPool
from semipd_engine.core.clock import VirtualClock
from semipd_engine.core.handoff import HANDOFFS, Handoff
from semipd_engine.core.kv_transfer import Transfer
from semipd_engine.core.messages import AdoptRequest, KVTransferred, OfferKV, ReleaseKV
from semipd_engine.core.request import Request, RequestStatus, SamplingParams, Timestamps
from semipd_engine.core.scheduler import EMPTY_RESULT, ExecuteResult, ScheduledBatch, Scheduler
from semipd_engine.shares.partition import Partition
from semipd_engine.sim.executor import SIM_TOKEN, CostModelExecutor, Work


@dataclass
class SimWorker:
    name: str
    role: str  # "both" | "prefill" | "decode"
    scheduler: Scheduler
    executor: CostModelExecutor
    share: int = 100  # compute share (%) of its device
    handoff_kind: Optional[str] = None  # "adopt" | "transfer" (semipd_engine.core.handoff)
    peers: tuple[str, ...] = ()  # decode workers (for a prefill worker), prefill workers (for a decode one)
    colocated: Optional[SimWorker] = None  # the other worker of a partitioned pair (semi-PD)
    handoff: Optional[Handoff] = None  # made by the simulator, which delivers its messages
    # state of the iteration in flight
    busy: bool = False
    batch: Optional[ScheduledBatch] = None
    result: Optional[ExecuteResult] = None
    iter_s: float = 0.0  # its duration, switch stall included (final once it ends: re-pricing moves it)
    work: Optional[Work] = None  # its cost before shares (a switch stall counts as host time)
    started_s: float = 0.0
    price_s: float = 0.0  # its whole duration at the current price
    left: float = 1.0  # the fraction of it still to run at `seg_t`
    seg_t: float = 0.0
    gen: int = 0  # its ITER_END events carry this; a re-price makes the earlier one stale
    pending_share: Optional[int] = None
    iterations: int = 0
    fast_forwarded: int = 0
    _rr: int = 0


@dataclass(frozen=True)
class LinkConfig:
    """A KV transfer link between a prefill and a decode instance (disaggregated engines)."""

    bandwidth_bytes_s: float
    fixed_s: float = 0.0
    layerwise_overlap: bool = False  # overlap the copy with prefill compute, layer by layer
    num_layers: int = 1


@dataclass
class SimStats:
    iterations: int = 0
    fast_forwarded: int = 0
    events: int = 0
    transfers: int = 0
    transfer_bytes: int = 0
    transfer_cached_blocks: int = 0  # not sent: the decode instance had them cached
    switches: int = 0
    finished_in_stretches: int = 0  # requests whose last token a fast-forwarded stretch sampled
    decisions: list[dict[str, Any]] = field(default_factory=list)
    kv_peak_blocks: dict[str, int] = field(default_factory=dict)
    # What a real server's /metrics would have shown, every `sample_every_s` of virtual time: rows of
    # (time_s, metric, labels, value) under the canonical names of experiments.analysis.server_metrics.
    samples: list[dict[str, Any]] = field(default_factory=list)


ARRIVAL, ITER_END, TRANSFER_DONE, CONTROL, RESUME = range(5)


class Simulator:
    """One simulated engine; `run(requests)` replays arrivals and returns the finished requests."""

    def __init__(self, workers: list[SimWorker], entry: list[str], clock: VirtualClock,
                 share_models=None, link: Optional[LinkConfig] = None, block_bytes: int = 0,
                 control=None, switch_cost_s: float = 0.0,
                 fast_forward: bool = True):
        self.workers = {w.name: w for w in workers}
        self.entry, self.clock = entry, clock
        self.share_models, self.link, self.block_bytes = share_models, link, block_bytes
        self.control, self.switch_cost_s = control, switch_cost_s
        self.pair = next(((w, w.colocated) for w in workers if w.colocated is not None and w.role == "prefill"),
                         None)
        self.fast_forward = fast_forward
        self.sample_every_s, self._next_sample = 0.0, math.inf
        self._iter_time: dict[str, float] = {}  # by phase, cumulative: the server's iteration-time histogram
        self._iter_n: dict[str, int] = {}
        self.stats = SimStats()
        self._heap: list[tuple[float, int, int, Any]] = []
        self._arrivals: list[Request] = []
        self._ai = 0
        self._follow: Optional[Callable[[Request, float], Optional[Request]]] = None
        self._seq = itertools.count()
        self._entry_rr = 0
        self._link_free_at = 0.0
        self._sent_by_poll: Optional[list[tuple[str, Any]]] = None
        self._done: list[Request] = []
        self._kicks: dict[str, SimWorker] = {}  # workers to decide at the end of this instant, in kick order
        self._dirty: dict[str, SimWorker] = {}  # iterations in flight to re-price then (the other phase changed)
        self._pools = {id(w.scheduler.pool): (w.name, w.scheduler.pool) for w in workers}
        for w in workers:
            w.executor.price = self._price_fn(w)
            if w.handoff_kind is not None:  # the receiving side of a transfer copies over the link
                kw = {"copy": self.link_copy} if w.handoff_kind == "transfer" and w.role == "decode" else {}
                w.handoff = HANDOFFS.get(w.handoff_kind)(w.name, w.scheduler.pool, self._send, **kw)

    # -- compute shares ------------------------------------------------------------------------
    def _price_fn(self, w: SimWorker) -> Callable[[Work], float]:
        """How long `w`'s iteration takes under the conditions right now (re-evaluated by `_reprice`)."""
        if self.share_models is None or w.colocated is None:
            return w.executor.alone
        sm, stack, phase = self.share_models, w.executor.stack, w.role
        w.executor.needs_memory_bound = sm.contention != 1.0

        def price(work: Work) -> float:
            share, other = w.share, w.colocated
            co_running = other.busy
            if co_running and share + other.share > 100:
                # Caps that add up past the device: both phases compete for the same SMs.
                share = share * 100.0 / (share + other.share)
            # Only the device part slows on a share (host time is CPU time), and only its HBM-bound part
            # stretches while the other phase draws on the same HBM.
            return stack.wall(work.host_s, sm.time(phase, work.device_s, share, work.memory_bound_s, co_running))

        return price

    def _reprice(self, w: SimWorker, t: float) -> None:
        """The other phase started or stopped: `w`'s iteration in flight will finish its remaining fraction at the
        new price, set once the instant is over (`_settle`: a phase that stops and starts again at one instant
        changes nothing)."""
        if w.busy and w.batch is not None:
            self._dirty[w.name] = w

    def _settle(self, t: float) -> None:
        # A fast-forward stretch never needs it: it stops before the other phase's next event.
        dirty, self._dirty = self._dirty, {}
        for w in dirty.values():
            if w.busy and w.batch is not None:
                self._reprice_now(w, t)

    def _reprice_now(self, w: SimWorker, t: float) -> None:
        d = w.executor.price(w.work)
        if d == w.price_s:
            return
        left = max(0.0, w.left - (t - w.seg_t) / w.price_s) if w.price_s > 0 else 0.0
        w.left, w.seg_t, w.price_s = left, t, d
        w.gen += 1
        self._push(t + left * d, ITER_END, (w, w.gen))

    # -- the event loop --------------------------------------------------------------------------
    def _push(self, t: float, kind: int, payload: Any) -> None:
        heapq.heappush(self._heap, (t, next(self._seq), kind, payload))

    def run(self, requests: list[Request], follow: Optional[Callable[[Request, float], Optional[Request]]] = None,
            total: Optional[int] = None) -> list[Request]:
        """Serve `requests` (each arriving at its `times.arrival`) and return them finished. `follow(req, t)`:
        the request due once `req` finishes at `t` (a conversation's next turn, its arrival set), or None; then
        `total` counts every request, those followed up included."""
        # Arrivals known up front: a sorted list beside the heap (they win ties, as if pushed first). Follow-ups
        # are known only when the request before finishes: they are events on the heap.
        self._arrivals = sorted(requests, key=lambda r: r.times.arrival)
        self._ai, self._follow = 0, follow
        if self.control is not None:
            self.control.reset(0.0)
            self._push(self.control.window_s, CONTROL, None)
        with paused_gc():
            self._events(len(requests), total or len(requests))
        for w in self.workers.values():
            self.stats.iterations += w.iterations
            self.stats.fast_forwarded += w.fast_forwarded
        # The caller owns the requests now. The simulator's parts refer to each other (workers, hand-offs, the
        # price functions): kept here, every request and token time would wait for a full collection to be freed.
        done, self._done, self._arrivals = self._done, [], []
        return done

    def _events(self, n: int, total: int) -> None:
        # Run for every event (~4 per request): what it reads of `self` is read once, before the loop.
        heap, arrivals, done, advance, pop = self._heap, self._arrivals, self._done, self.clock.advance_to, heapq.heappop
        events = 0
        while len(done) < total:
            if self._ai < n and (not heap or arrivals[self._ai].times.arrival <= heap[0][0]):
                req = arrivals[self._ai]
                self._ai += 1
                t, kind, payload = req.times.arrival, ARRIVAL, req
            elif heap:
                t, _, kind, payload = pop(heap)
            else:
                break
            while self._next_sample <= t:  # the state between two events holds until the later one
                self._sample(self._next_sample)
                self._next_sample += self.sample_every_s
            advance(t)
            events += 1
            if kind == ITER_END:
                w, gen = payload
                if gen == w.gen:  # else re-priced: a later event ends it
                    self._end_iteration(w, t)
            elif kind == ARRIVAL:
                self._arrive(payload, t)
            elif kind == RESUME:
                self._resume(payload, t)
            elif kind == TRANSFER_DONE:
                self._transfer_done(payload, t)
            else:
                self._control(t)
            if self._kicks or self._dirty:
                nxt = arrivals[self._ai].times.arrival if self._ai < n else math.inf
                if (heap[0][0] if heap and heap[0][0] < nxt else nxt) > t:
                    self._flush_kicks(t)
                    if self._dirty:
                        self._settle(t)
        self.stats.events += events

    def sample_every(self, seconds: float) -> None:
        """Record `stats.samples` every `seconds` of virtual time from 0 (off by default: a speed benchmark
        should not pay for it)."""
        self.sample_every_s, self._next_sample = seconds, 0.0

    def _sample(self, t: float) -> None:
        """Queues, KV use, compute shares and the iteration-time histogram now, as the server's /metrics would
        read. Inside a fast-forwarded stretch queues are exact (nothing joins or leaves the batch); KV use and the
        histogram hold the stretch's end values."""
        rows = self.stats.samples
        for w in self.workers.values():
            sched, label = w.scheduler, f'instance="{w.name}"'
            rows.append({"time_s": t, "metric": "requests_running", "labels": label, "value": len(sched.running)})
            rows.append({"time_s": t, "metric": "requests_waiting", "labels": label,
                         "value": len(sched.waiting) + len(sched.parked)})
            if w.colocated is not None:
                rows.append({"time_s": t, "metric": f"partition_{w.role}_share", "labels": "", "value": w.share})
        for name, pool in self._pools.values():
            label = f'instance="{name}"'
            rows.append({"time_s": t, "metric": "kv_blocks_used", "labels": label, "value": pool.num_used})
            rows.append({"time_s": t, "metric": "kv_blocks_total", "labels": label, "value": pool.num_blocks})
        for ph, n in self._iter_n.items():  # cumulative, as a histogram's _sum and _count
            rows.append({"time_s": t, "metric": "iteration_time_sum_s", "labels": f'phase="{ph}"',
                         "value": self._iter_time[ph]})
            rows.append({"time_s": t, "metric": "iterations", "labels": f'phase="{ph}"', "value": n})

    def _next_arrival(self) -> float:
        return self._arrivals[self._ai].times.arrival if self._ai < len(self._arrivals) else math.inf

    def _arrivals_matter(self, w: SimWorker) -> bool:
        """Could an arrival change what `w` decides or how fast it runs, before the next other event?"""
        if w.name in self.entry:  # it would join w's queue: it matters unless admission is blocked anyway
            return not self._admission_blocked(w.scheduler)
        # It goes to another worker. A busy one only queues it; an idle one would start an iteration whose end
        # (a hand-off, a KV transfer, a co-located phase running) could reach w inside the window.
        return not all(self.workers[name].busy for name in self.entry)

    @staticmethod
    def _admission_blocked(sched: Scheduler) -> bool:
        """True when the policy cannot admit the head of its queue until a request leaves (arrivals join
        the tail; fast-forward only takes blocks, so a blocked head stays blocked)."""
        if not sched.waiting:
            return False
        if len(sched.running) >= sched.max_num_seqs:
            return True
        head, pool = sched.waiting[0], sched.pool
        return pool.blocks_needed(head.num_tokens, len(head.block_table)) > pool.num_free - pool.watermark_blocks

    def _arrive(self, req: Request, t: float) -> None:
        name = self.entry[self._entry_rr % len(self.entry)]
        self._entry_rr += 1
        w = self.workers[name]
        w.scheduler.add(req)
        if self.control is not None:
            self.control.arrival()
        self._kick(w, t)

    def _kick(self, w: SimWorker, t: float) -> None:
        """`w` may have work: it decides once every event of this instant is handled (`_flush_kicks`)."""
        if not w.busy:
            self._kicks[w.name] = w

    def _flush_kicks(self, t: float) -> None:
        # A real worker drains its whole inbox before it schedules: requests arriving together, or handed off
        # by one iteration together, start one batch, not one each.
        kicks = self._kicks
        while kicks:
            w = kicks.pop(next(iter(kicks)))
            if not w.busy and w.scheduler.has_work():
                self._start(w, t)

    def _start(self, w: SimWorker, t: float) -> None:
        if w.pending_share is not None:
            w.share, w.pending_share = w.pending_share, None
            self.stats.switches += 1
            stall = self.switch_cost_s
        else:
            stall = 0.0
        sched = w.scheduler
        batch = sched.schedule(t)
        if not batch:
            self._route(w, sched.update(batch, EMPTY_RESULT, t), t)
            return
        result = w.executor.execute(batch)
        w.iterations += 1
        if self.fast_forward and stall == 0.0:
            resume = self._fast_forward(w, batch, result, t)
            if resume is not None:  # iterations applied up to `resume`: the policy decides again then
                self._track_pool(sched.pool)
                w.busy, w.batch, w.result = True, None, None
                self._push(resume, RESUME, w)
                if w.colocated is not None:
                    self._reprice(w.colocated, t)
                return
        self._track_pool(sched.pool)
        w.busy, w.batch, w.result = True, batch, result
        work = w.executor.work
        if stall:
            work = Work(work.host_s + stall, work.device_s, work.memory_bound_s)
            w.iter_s = w.executor.price(work)
        else:
            w.iter_s = result.duration_s
        w.work, w.started_s, w.price_s, w.left, w.seg_t = work, t, w.iter_s, 1.0, t
        w.gen += 1
        self._push(t + w.iter_s, ITER_END, (w, w.gen))
        if w.colocated is not None:
            self._reprice(w.colocated, t)

    def _resume(self, w: SimWorker, t: float) -> None:
        w.busy = False
        self._kick(w, t)
        if w.colocated is not None:
            self._reprice(w.colocated, t)
            self._kick(w.colocated, t)

    def _end_iteration(self, w: SimWorker, t: float) -> None:
        batch, result = w.batch, w.result
        w.busy, w.batch, w.result = False, None, None
        w.iter_s = t - w.started_s
        if w.colocated is not None:
            self._reprice(w.colocated, t)
        outcome = w.scheduler.update(batch, result, t)
        if outcome.ran:
            ph = outcome.phase
            self._iter_time[ph] = self._iter_time.get(ph, 0.0) + w.iter_s
            self._iter_n[ph] = self._iter_n.get(ph, 0) + 1
            if self.control is not None and w.role == "prefill":
                self.control.prefill_iteration(w.iter_s, len(outcome.handoffs) + len(outcome.finished))
        self._route(w, outcome, t)
        self._kick(w, t)
        if w.colocated is not None:
            self._kick(w.colocated, t)

    def _route(self, w: SimWorker, outcome, t: float) -> None:
        for req in outcome.finished:
            self._finish(req, t)
        for req in outcome.handoffs:
            w.handoff.hand_off(req, self._next_peer(w))
        for req in outcome.evicted:
            target = self.workers[self._next_peer(w)]
            target.scheduler.add(req)  # preempted: back to the front of the prefill queue
            self._kick(target, t)
        if outcome.finished and w.handoff is not None and w.handoff.busy:
            self._poll(w, t)  # freed blocks may admit a waiting transfer

    def _next_peer(self, w: SimWorker) -> str:
        w._rr += 1
        return w.peers[w._rr % len(w.peers)]

    def _finish(self, req: Request, t: float) -> None:
        self._done.append(req)
        if self.control is not None:
            self.control.finished(req.times.arrival, req.times.first_token, t, len(req.output_token_ids))
        if self._follow is not None:
            nxt = self._follow(req, t)
            if nxt is not None:
                self._push(nxt.times.arrival, ARRIVAL, nxt)

    # -- fast-forward ------------------------------------------------------------------------------
    def _fast_forward(self, w: SimWorker, batch: ScheduledBatch, result: ExecuteResult, t: float) -> Optional[float]:
        """Apply the decode iterations that cannot differ from the one just scheduled, in one step.

        Iteration 0 is `batch`, already scheduled at `t`. Iterations 0..A-1 are applied here when
        (1) each ends before the next event of the simulation (the decision at its end precedes every
        other event, so nothing else can change what the policy sees), (2) no request finishes in them,
        and (3) the blocks the requests grow into during iterations 1..A-1 are free (then every
        reservation the policy would make succeeds, and nobody else reads the pool before the next
        event), and (4) the other phase on the same device cannot act on the pool meanwhile (it is busy,
        or idle with nothing to do). Returns when iteration A starts (the policy schedules it then, at a
        RESUME event), or None when nothing was applied.
        """
        sched = w.scheduler
        if sched.hands_off or len(batch.items) + batch.group != len(sched.running):
            return None
        if sched.waiting and not (sched.runs_prefill and self._admission_blocked(sched)):
            return None  # it would admit one, or (a decode-only worker) evict its preempted requests now
        horizon = self._heap[0][0] if self._heap else math.inf
        if self._arrivals_matter(w):
            horizon = min(horizon, self._next_arrival())
        if t + result.duration_s >= horizon:
            return None
        other = w.colocated
        if other is not None and not other.busy and other.scheduler.has_work():
            return None  # it is retried at each of our iteration ends, against the pool as it is then
        if sched.group is not None:  # an iteration of single decodes has a group dissolved: its next one is not
            return self._fast_forward_group(w, batch, result, t, horizon) if batch.group and not batch.items else None
        k = math.inf
        max_len = sched.max_model_len
        for r, n in batch.items:
            out = r.output_token_ids
            n_prompt, n_out = len(r.prompt_token_ids), len(out)
            if n != 1 or not n_out or r.num_computed_tokens + 1 != n_prompt + n_out:
                return None  # not a decode: a prompt, or a one-token chunk of a recompute
            # after iteration i, the request has len(out) + i + 1 outputs and num_tokens + i + 1 tokens
            room = min(r.params.max_tokens - n_out, max_len - n_prompt - n_out) - 1
            if room < 2:
                return None  # a request finishes at the next iteration (at saturation: most iterations)
            if room < k:
                k = room
        ctx = sum(r.num_computed_tokens + 1 for r, _ in batch.items)  # context of iteration 0
        ends = self._stretch(w, len(batch.items), ctx, k, t, result.duration_s, horizon)
        applied = self._grow_blocks(sched, batch, len(ends))
        if applied == 0:
            return None
        ends = ends[:applied]
        tail = [SIM_TOKEN] * applied
        for r, _ in batch.items:
            r.output_token_ids.extend(tail)
            r.times.tokens.extend(ends)
            r.num_computed_tokens += applied
        if sched.pool.prefix_caching:
            sched.register(batch)
        return self._applied(w, ends, t)

    @staticmethod
    def _stretch(w: SimWorker, nb: int, ctx: int, k: int, t: float, d: Optional[float],
                 horizon: float) -> list[float]:
        """End times of up to `k` decode iterations of `nb` sequences from `t` (the first, of context `ctx`, takes
        `d`; None: priced here), each ending before `horizon`."""
        price, works = w.executor.price, w.executor.decode_works  # the other phase holds (see _fast_forward)
        if d is None:
            if k < 1:
                return []
            d = price(works(nb, ctx, 1)[0])
        cap = int(min(k - 1, 4096))  # iterations 1, 2, ... priced at most
        later: list = []  # their work, priced a chunk at a time: the next event usually ends a stretch early
        ends: list[float] = []
        end = t
        while True:
            e = end + d
            if e >= horizon:
                break
            ends.append(e)
            end = e
            i = len(ends) - 1
            if len(ends) >= k or i >= cap:
                break
            if i == len(later):
                later += works(nb, ctx + nb * (1 + i), min(cap - i, max(16, i)))
            d = price(later[i])
        return ends

    def _applied(self, w: SimWorker, ends: list[float], t: float) -> float:
        """Count a stretch that started at `t` as run; returns its end (the policy decides again then)."""
        w.iterations += len(ends) - 1  # iteration 0 is counted by the caller
        w.fast_forwarded += len(ends)
        self._iter_time["decode"] = self._iter_time.get("decode", 0.0) + (ends[-1] - t)
        self._iter_n["decode"] = self._iter_n.get("decode", 0) + len(ends)
        return ends[-1]

    def _fast_forward_group(self, w: SimWorker, batch: ScheduledBatch, result: ExecuteResult, t: float,
                            horizon: float) -> Optional[float]:
        """`_fast_forward` for a decode group: the same stretch, its blocks reserved iteration by iteration
        (`Scheduler.group_run`), one end time per iteration for all members; and through the members' last
        tokens where a finish cannot change anything but the batch (`_finishes_pass`): the finished leave as
        `update` finishes them, at their iteration's end, and the group goes on with the rest, priced anew.
        A stretch with a finish ends before the next server sample (the queues it reads are the stretch's end)."""
        sched = w.scheduler
        g = sched.group
        through = self._finishes_pass(w)
        ends_all: list[float] = []
        nb, ctx, d, start, scheduled = batch.group, batch.group_ctx, result.duration_s, t, True
        while True:
            k = g.next_finish() - g.gen  # iterations gen .. gen + k - 1 end without a last token
            limit = min(horizon, self._next_sample) if ends_all else horizon  # a finish passed: stop before a sample
            ends = self._stretch(w, nb, ctx, k + 1 if through else k, start, d, limit)
            finishing = through and len(ends) == k + 1
            if finishing and ends[-1] >= self._next_sample:
                ends, finishing = ends[:k], False  # its queues would be sampled as the stretch's end has them
            if not ends_all and len(ends) < 2 and not finishing:
                return None  # nothing to skip: the policy runs the iteration as scheduled
            applied = sched.group_run(ends, scheduled) if ends else 0
            ends_all += ends[:applied]
            if applied < len(ends) or not finishing:
                break
            self._track_pool(sched.pool)  # the peak before the finished free their blocks
            for req in sched.group_finish(ends[-1]):
                self._finish(req, ends[-1])
                self.stats.finished_in_stretches += 1
            if not g.n:
                break
            nb, ctx, start, scheduled = g.n, g.ctx, ends[-1], False
            d = None  # the next iteration is priced here, as the policy's batch of the remaining members would be
        return self._applied(w, ends_all, t) if ends_all else None

    def _finishes_pass(self, w: SimWorker) -> bool:
        """Can a member's last token leave everything but the batch as it is, until the next event? Not where the
        freed room admits a queued request (waiting or parked here, or a transfer to this worker), nor where
        the finish starts a conversation's next turn."""
        sched = w.scheduler
        return (self._follow is None and not sched.waiting and not sched.parked and not sched.group.pending
                and not (w.handoff is not None and w.handoff.busy))

    @staticmethod
    def _grow_blocks(sched: Scheduler, batch: ScheduledBatch, applied: int) -> int:
        """Reserve the blocks iterations 1..applied-1 grow into; fewer iterations if the pool is short."""
        pool = sched.pool
        bs = pool.block_size

        def demand(a: int) -> int:  # iteration i is scheduled with num_tokens + i tokens
            return sum(max(0, (r.num_tokens + a - 1 + bs - 1) // bs - len(r.block_table)) for r, _ in batch.items)

        while applied > 0 and demand(applied) > pool.num_free:
            applied //= 2
        if applied > 1:
            for r, _ in batch.items:
                need = (r.num_tokens + applied - 1 + bs - 1) // bs - len(r.block_table)
                if need > 0:
                    r.block_table += pool.try_allocate(need)
        return applied

    # -- hand-offs: the workers' own objects, their messages delivered here --------------------------
    def _send(self, peer: str, msg) -> None:
        t, target = self.clock.now(), self.workers[peer]
        if isinstance(msg, AdoptRequest):  # one pool: the decode worker takes the blocks as they are
            target.scheduler.adopt(msg.request)
            self._kick(target, t)
        elif isinstance(msg, OfferKV):
            target.handoff.handle(msg)
            self._poll(target, t)
        elif isinstance(msg, ReleaseKV):
            if self._sent_by_poll is not None:  # a copy just started: the release lands when the link is done
                self._sent_by_poll.append((peer, msg))
            elif target.handoff.handle(msg):
                self._kick(target, t)
        else:
            raise TypeError(f"unexpected hand-off message {type(msg).__name__}")

    def link_copy(self, t: Transfer, dst: list[int]) -> tuple[int, float]:
        """The simulated mechanism of a KV transfer: bytes over the link's bandwidth, no copy."""
        nbytes = len(dst) * self.block_bytes
        seconds = nbytes / self.link.bandwidth_bytes_s
        if self.link.layerwise_overlap:  # all but the last layer's copy hides behind prefill compute
            seconds /= max(1, self.link.num_layers)
        return nbytes, seconds + self.link.fixed_s

    def _poll(self, w: SimWorker, t: float) -> None:
        """Start the transfers the receiver has room for; each lands when the one link has carried it."""
        reports: list[KVTransferred] = []
        self._sent_by_poll = []
        try:
            started = w.handoff.poll(reports.append)
            releases = self._sent_by_poll
        finally:
            self._sent_by_poll = None
        for req, report, (source, release) in zip(started, reports, releases):
            start = max(t, self._link_free_at)  # one link: transfers queue behind each other
            self._link_free_at = start + report.seconds
            self.stats.transfers += 1
            self.stats.transfer_bytes += report.nbytes
            self.stats.transfer_cached_blocks += report.cached_blocks
            self._push(self._link_free_at, TRANSFER_DONE, (w, req, source, release))
        self._track_pool(w.scheduler.pool)

    def _transfer_done(self, payload, t: float) -> None:
        w, req, source, release = payload
        src = self.workers[source]
        src.handoff.handle(release)  # the prefill instance's blocks go back now
        if req.status is RequestStatus.RUNNING:
            w.scheduler.adopt(req)
        self._kick(w, t)
        self._kick(src, t)

    # -- SLO-aware partitioning ------------------------------------------------------------------
    def _control(self, t: float) -> None:
        prefill, decode = self.pair
        current = Partition(prefill.pending_share or prefill.share, decode.pending_share or decode.share)
        d = self.control.step(t, t, current)
        if d.new != current:
            prefill.pending_share, decode.pending_share = d.new.prefill_share, d.new.decode_share
        self.stats.decisions.append(d.row())
        if self._heap or self._ai < len(self._arrivals):  # stop controlling once nothing else can happen
            self._push(t + self.control.window_s, CONTROL, None)

    def _track_pool(self, pool: BlockPool) -> None:
        used, name = pool.num_used, self._pools[id(pool)][0]
        peak = self.stats.kv_peak_blocks
        if used > peak.get(name, 0):
            peak[name] = used


@contextlib.contextmanager
def paused_gc() -> Iterator[None]:
    """No cyclic garbage collection inside the block, then one of what the block allocated (the youngest
    generation). A simulation allocates millions of objects and frees them by reference count; a full
    collection, triggered every ~25% heap growth, walked every live request's token list again (~150 ms each,
    about once per 4,000-request run, ~14% of a simulated goodput search)."""
    if not gc.isenabled():  # nested, or the caller's choice
        yield
        return
    gc.disable()
    try:
        yield
    finally:
        gc.enable()
        gc.collect(0)


def make_requests(arrivals, prompt_lens, output_lens, prompt_ids=None) -> list[Request]:
    """Simulated requests: token ids are placeholders (only lengths matter to a cost model), unless `prompt_ids`
    gives them (workloads whose prompts share prefixes: the prefix cache sees what a real engine would)."""
    return [make_request(i, a, p, o, None if prompt_ids is None else prompt_ids[i])
            for i, (a, p, o) in enumerate(zip(arrivals, prompt_lens, output_lens))]


def make_request(i: int, arrival: float, prompt_len: int, output_len: int,
                 prompt_ids: Optional[list[int]] = None) -> Request:
    given = prompt_ids is not None
    # Placeholder tokens are all alike: a salt per request keeps their blocks from matching each other's.
    return Request(f"sim-{i}", list(prompt_ids) if given else [SIM_TOKEN] * prompt_len,
                   SamplingParams(max_tokens=output_len, ignore_eos=True, temperature=0.0),
                   times=Timestamps(arrival=float(arrival)), cache_salt=None if given else f"sim-{i}",
                   placeholder_tokens=not given)
