"""The simulator's executor: a cost model in place of the forward pass.

It returns the same `ExecuteResult` as the model runner: every request that
reached the end of its known tokens gets a token (id 0: simulated requests run
to their output length, as the load generator's `ignore_eos` requests do), and
the duration is the cost model's time for the batch's shape, scaled by the
worker's compute share at the moment the iteration starts.
"""

from __future__ import annotations

from collections.abc import Callable

from semipd_engine.core.scheduler import ExecuteResult, ScheduledBatch
from semipd_engine.sim.batch import BatchShape

SIM_TOKEN = 0


def batch_shape(batch: ScheduledBatch) -> BatchShape:
    return BatchShape.of((r.num_computed_tokens, n, r.num_computed_tokens + n == r.num_tokens)
                         for r, n in batch.items)


class CostModelExecutor:
    def __init__(self, cost, factor: Callable[[], float] = lambda: 1.0):
        self.cost, self.factor = cost, factor  # factor: slowdown of this worker's share right now

    def execute(self, batch: ScheduledBatch) -> ExecuteResult:
        items = [(r.num_computed_tokens, n, r.num_computed_tokens + n == r.num_tokens, r) for r, n in batch.items]
        shape = BatchShape.of(it[:3] for it in items)
        sampled = [(it[3], SIM_TOKEN) for it in items if it[2]]
        return ExecuteResult(sampled, self.cost.iteration_time(shape) * self.factor())
