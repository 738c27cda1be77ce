"""EngineCore: one iteration at a time, `schedule -> execute -> update`.

The core composes a scheduler (a policy from semipd_engine.core.policies), an
executor (the model runner; the simulator's cost model) and a clock. It never
names a policy and never imports torch: what differs between engines is which
policy runs where, and what executes a batch.

A worker process runs one core; `generate` runs one in-process for offline
batch inference, tests and benchmarks. `semipd_engine.runtime.factory.build_core`
builds a core over a real model.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Protocol

from semipd_engine.core.clock import WALL, Clock
from semipd_engine.core.request import Request, SamplingParams, Timestamps
from semipd_engine.core.scheduler import EMPTY_RESULT, ExecuteResult, ScheduledBatch, Scheduler, StepOutcome

log = logging.getLogger(__name__)


class Executor(Protocol):
    def execute(self, batch: ScheduledBatch) -> ExecuteResult: ...


@dataclass(frozen=True)
class IterationStats:
    phase: str  # "prefill" | "decode" | "mixed" | "idle" (state only, no iteration)
    duration_s: float
    num_prefill_tokens: int
    num_decode_tokens: int
    kv_blocks_used: int
    kv_blocks_total: int
    num_running: int
    num_waiting: int
    preemptions_total: int
    kv_blocks_cached: int = 0  # full blocks registered in the prefix cache (referenced or not)
    prefix_cache_queries_total: int = 0  # prompt tokens looked up at admission, cumulative
    prefix_cache_hits_total: int = 0  # of them, found cached


class EngineCore:
    def __init__(self, scheduler: Scheduler, executor: Executor, clock: Clock = WALL,
                 eos_token_ids: tuple[int, ...] = ()):
        self.scheduler, self.executor, self.clock = scheduler, executor, clock
        self.pool = scheduler.pool
        self.eos_token_ids = eos_token_ids  # for requests that arrive without their model's stop ids

    @property
    def max_model_len(self) -> int:
        return self.scheduler.max_model_len

    def add_request(self, req: Request) -> None:
        if not req.times.arrival:
            req.times.arrival = self.clock.now()
        if not req.eos_token_ids:
            req.eos_token_ids = self.eos_token_ids
        self.scheduler.add(req)

    def adopt(self, req: Request) -> None:
        self.scheduler.adopt(req)

    def abort(self, request_id: str) -> bool:
        return self.scheduler.abort(request_id)

    def has_work(self) -> bool:
        return self.scheduler.has_work()

    def step(self) -> StepOutcome:
        batch = self.scheduler.schedule(self.clock.now())
        if not batch:
            return self.scheduler.update(batch, EMPTY_RESULT, self.clock.now())
        rng = [req.rng_state for req, _ in batch.items]
        try:
            result = self.executor.execute(batch)
        except Exception as e:  # one request must not take the engine down: contain it
            return self._contain(batch, rng, e)
        return self.scheduler.update(batch, result, self.clock.now())

    def _contain(self, batch: ScheduledBatch, rng: list, error: Exception) -> StepOutcome:
        """The executor raised on `batch`: find the requests that fail on their own, fail them, keep the rest.

        Every item runs again alone (an iteration only writes each request's own KV slots, so a
        re-run writes the same bytes; sampling states are restored first, so seeded streams stay
        reproducible). Items that still raise are failed with the error and their blocks freed;
        the others' tokens count as this iteration's. A systematic fault fails the whole batch.
        """
        log.warning("iteration of %d requests failed (%s: %s); isolating", len(batch.items),
                    type(error).__name__, error, exc_info=error)
        good: list[tuple[Request, int]] = []
        sampled: list[tuple[Request, int]] = []
        failed: list[tuple[Request, Exception]] = []
        duration = 0.0
        for (req, n), state in zip(batch.items, rng):
            req.rng_state = state
            if len(batch.items) == 1:
                failed.append((req, error))
                break
            try:
                res = self.executor.execute(ScheduledBatch([(req, n)]))
            except Exception as e:
                req.rng_state = state
                failed.append((req, e))
                continue
            good.append((req, n))
            sampled += res.sampled
            duration += res.duration_s
        now = self.clock.now()
        outcome = self.scheduler.update(ScheduledBatch(good, batch.preempted), ExecuteResult(sampled, duration), now)
        for req, e in failed:
            log.error("request %s failed in the engine: %s: %s", req.request_id, type(e).__name__, e)
            outcome.outputs.append(self.scheduler.fail(req, f"{type(e).__name__}: {e}", now))
        return outcome

    def stats(self, outcome: StepOutcome | None = None) -> IterationStats:
        """Pool and queue state after an iteration (or, without one, as an "idle" snapshot)."""
        s = self.scheduler
        ran = outcome is not None and outcome.ran
        return IterationStats(
            phase=outcome.phase if ran else "idle", duration_s=outcome.duration_s if ran else 0.0,
            num_prefill_tokens=outcome.num_prefill_tokens if ran else 0,
            num_decode_tokens=outcome.num_decode_tokens if ran else 0,
            kv_blocks_used=self.pool.num_used, kv_blocks_total=self.pool.num_blocks,
            num_running=len(s.running), num_waiting=len(s.waiting), preemptions_total=s.num_preemptions,
            kv_blocks_cached=self.pool.num_cached, prefix_cache_queries_total=s.prefix_queries,
            prefix_cache_hits_total=s.prefix_hits,
        )

    def generate(self, prompts: list[list[int]], params: SamplingParams | list[SamplingParams]) -> list[list[int]]:
        """Run prompts to completion; returns the output token ids of each."""
        plist = params if isinstance(params, list) else [params] * len(prompts)
        now = self.clock.now()
        reqs = [Request(f"offline-{i}", list(p), sp, times=Timestamps(arrival=now))
                for i, (p, sp) in enumerate(zip(prompts, plist))]
        for r in reqs:
            self.add_request(r)
        while self.has_work():
            self.step()
        return [r.output_token_ids for r in reqs]
