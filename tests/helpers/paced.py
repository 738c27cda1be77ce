"""Fixed iteration times on the process driver: each worker's real iterations padded to a cost model's time.

The event driver charges `cost.iteration_time(shape)` per iteration on its virtual clock; wrapping a real
worker's executor in `Paced(cost)` makes its iterations take exactly that long on the wall clock (the forward
pass runs, then the worker sleeps to the end of the iteration). Back-to-back iterations are laid on one timeline
without gaps, so the driver's own few hundred microseconds between iterations do not add up; an iteration that
starts after the worker idled starts when it starts. With both drivers charging the same times, the per-request
token times can only differ where the drivers differ: what each iteration contains, and when a hand-off lands.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from semipd_engine.sim.batch import BaseCostModel, BatchShape
from semipd_engine.sim.executor import batch_shape


@dataclass(frozen=True)
class FixedCost(BaseCostModel):
    """base_s per iteration + per_token_s per new token: a batch's contents show in its time."""

    base_s: float
    per_token_s: float
    name: str = "fixed"

    def iteration_time(self, shape: BatchShape) -> float:
        return self.base_s + self.per_token_s * shape.num_tokens


@dataclass(frozen=True)
class Paced:
    cost: FixedCost
    slack_s: float = 0.004  # a gap shorter than this after the last iteration is the driver's own overhead

    def __call__(self, executor):
        return PacedExecutor(executor, self.cost, self.slack_s)


class PacedExecutor:
    def __init__(self, inner, cost, slack_s: float):
        self.inner, self.cost, self.slack_s = inner, cost, slack_s
        self.last_end = float("-inf")
        self.overruns = 0  # iterations whose forward pass alone took longer than the cost model's time

    def execute(self, batch):
        shape = batch_shape(batch)  # before the executor runs: the scheduler's counts move on update
        now = time.monotonic()
        start = self.last_end if now - self.last_end < self.slack_s else now
        result = self.inner.execute(batch)
        end = start + self.cost.iteration_time(shape)
        left = end - time.monotonic()
        if left > 0:
            time.sleep(left)
        else:
            self.overruns += 1
        self.last_end = end
        return result

    def __getattr__(self, name):  # kv, device, ...: the worker reads them off its executor
        return getattr(self.inner, name)
