"""Where every timestamp comes from: the wall clock for real engines, a virtual one for the simulator.

Policies, requests and the engine core never call `time` themselves; they are
handed a clock, so the same scheduling code runs unchanged on simulated time.
"""

from __future__ import annotations

import time
from typing import Protocol


class Clock(Protocol):
    def now(self) -> float: ...


class WallClock:
    """`time.monotonic()`: system-wide on Linux, so comparable across the server and worker processes."""

    def now(self) -> float:
        return time.monotonic()


class VirtualClock:
    """Simulated seconds, moved only by whoever drives the simulation (never backwards)."""

    def __init__(self, start: float = 0.0):
        self.t = start

    def now(self) -> float:
        return self.t

    def advance_to(self, t: float) -> None:
        if t < self.t:
            raise ValueError(f"virtual time cannot go back from {self.t} to {t}")
        self.t = t


WALL = WallClock()
