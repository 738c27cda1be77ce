"""The SLO-aware partitioner's loop, one object for both drivers.

Every `engine.control_window_s` the loop closes a window (what the engine saw:
arrivals, finished requests' TTFT and TPOT, the prefill worker's iteration time
and how many requests it prefilled), asks `SLOPartitioner` for the next
partition, and records the decision. The process driver feeds it from the
server (arrivals, finished requests) and from worker reports (iterations) on the
wall clock; the event driver from its events on the virtual clock. Only when a
window closes differs (an asyncio timer, a CONTROL event).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Optional

from semipd_engine.control.slo_partitioner import ControllerConfig, Decision, SLOPartitioner, Window
from semipd_engine.shares.partition import Partition, placement


def make_partitioner(engine_cfg, cores: Optional[Sequence[int]] = None) -> SLOPartitioner:
    """`engine.slo_*` and the step bounds; on CPU (`cores` given) only partitions that place the workers
    differently are distinct steps."""
    e = engine_cfg
    cfg = ControllerConfig(e.slo_ttft_s, e.slo_tpot_s, e.slo_percentile, e.step_size, e.max_step, e.min_share,
                           e.max_share, futile_cap_windows=e.futile_cap_windows, futile_fraction=e.futile_fraction)
    if cores:
        cores = tuple(cores)
        return SLOPartitioner(cfg, distinct=lambda a, b: placement(a, cores) != placement(b, cores))
    return SLOPartitioner(cfg)


class ControlLoop:
    def __init__(self, engine_cfg, cores: Optional[Sequence[int]] = None, log_path: Optional[str] = None):
        self.partitioner = make_partitioner(engine_cfg, cores)
        self.window_s = engine_cfg.control_window_s
        self.log_path = log_path  # one JSON line per decision (the job saves it as partition_log.jsonl)
        self.decisions: list[dict] = []
        self.reset(0.0)

    # -- observations ----------------------------------------------------------------------------
    def reset(self, now: float) -> None:
        self._start, self._ttfts, self._tpots = now, [], []
        self._arrivals, self._busy_s, self._prefilled = 0, 0.0, 0

    def arrival(self) -> None:
        self._arrivals += 1

    def finished(self, arrival: float, first_token: Optional[float], finished: float, output_tokens: int) -> None:
        if first_token is None:
            return
        self._ttfts.append(first_token - arrival)
        if output_tokens > 1:
            self._tpots.append((finished - first_token) / (output_tokens - 1))

    def prefill_iteration(self, duration_s: float, prefilled: int) -> None:
        """An iteration of the prefill worker; `prefilled`: requests that finished their prompt in it."""
        self._busy_s += duration_s
        self._prefilled += prefilled

    # -- decisions -------------------------------------------------------------------------------
    def step(self, now: float, time_s: float, current: Partition) -> Decision:
        """Close the window at `now` and decide; `time_s` is the decision's time on the run's clock."""
        window = Window(now - self._start, self._ttfts, self._tpots, self._arrivals, self._busy_s, self._prefilled)
        self.reset(now)
        d = self.partitioner.step(time_s, window, current)
        self.record(d.row())
        return d

    def record(self, row: dict) -> None:
        self.decisions.append(row)
        if self.log_path:
            with open(self.log_path, "a") as f:
                f.write(json.dumps(row) + "\n")
