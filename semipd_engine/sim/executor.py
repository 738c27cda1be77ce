"""The simulator's executor: a cost model and a serving stack in place of the forward pass.

It returns the same `ExecuteResult` as the model runner: every request that
reached the end of its known tokens gets a token (id 0: simulated requests run
to their output length, as the load generator's `ignore_eos` requests do), and
the duration is the iteration's `Work` priced by `price`: alone on its device,
the stack's host time and the cost model's device time combined; a partitioned
worker's price (set by the simulator) also scales the device part by its
compute share and the other phase's contention, and the simulator re-prices an
iteration in flight when that changes.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

from semipd_engine.core.scheduler import ExecuteResult, ScheduledBatch
from semipd_engine.sim.batch import BatchShape, shape_and_sampled
from semipd_engine.sim.stack import IDEAL, ServingStack

SIM_TOKEN = 0


class Work(NamedTuple):
    """What one iteration costs before any compute share or contention applies (a named tuple, as BatchShape)."""

    host_s: float  # the serving stack's CPU time (never slowed by a share)
    device_s: float  # the cost model's time on the whole device, alone
    memory_bound_s: float = 0.0  # the HBM-bound part of device_s (what a co-running phase's traffic stretches)


def batch_shape(batch: ScheduledBatch) -> BatchShape:
    return shape_and_sampled(batch.items, SIM_TOKEN, batch.group, batch.group_ctx)[0]


class CostModelExecutor:
    def __init__(self, cost, stack: ServingStack = IDEAL):
        self.cost, self.stack = cost, stack
        self.price: Callable[[Work], float] = self.alone
        self.needs_memory_bound = False  # set by the simulator where contention can stretch it
        self.work = Work(0.0, 0.0)  # of the last iteration executed

    def alone(self, work: Work) -> float:
        return self.stack.wall(work.host_s, work.device_s)

    def work_of(self, shape: BatchShape) -> Work:
        mem = self.cost.memory_bound_time(shape) if self.needs_memory_bound else 0.0
        return Work(self.stack.host_time(shape), self.cost.iteration_time(shape), mem)

    def execute(self, batch: ScheduledBatch) -> ExecuteResult:
        shape, sampled = shape_and_sampled(batch.items, SIM_TOKEN, batch.group, batch.group_ctx)
        self.work = self.work_of(shape)
        return ExecuteResult(sampled, self.price(self.work))

    def decode_works(self, batch: int, ctx_tokens: int, steps: int) -> list[Work]:
        """`Work` of `steps` decode-only iterations whose summed context grows by `batch` each step."""
        host = self.stack.decode_host_time(batch)
        if self.needs_memory_bound:
            times, mems = self.cost.decode_times_memory_bound(batch, ctx_tokens, steps)
            return [Work(host, t, m) for t, m in zip(times, mems)]
        return [Work(host, t) for t in self.cost.decode_times(batch, ctx_tokens, steps)]
