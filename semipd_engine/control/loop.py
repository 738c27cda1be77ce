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

import dataclasses
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


# The engine keys that only say what the controller steers to: runs that differ in them alone behave the same until
# their controllers decide differently (`ControlLoop.replay`).
STEERING_KEYS = ("slo_ttft_s", "slo_tpot_s", "slo_percentile")


class ControlLoop:
    def __init__(self, engine_cfg, cores: Optional[Sequence[int]] = None, log_path: Optional[str] = None,
                 keep_inputs: bool = False):
        self.partitioner = make_partitioner(engine_cfg, cores)
        self.cores = list(cores) if cores else None
        self.window_s = engine_cfg.control_window_s
        self.log_path = log_path  # one JSON line per decision (the job saves it as partition_log.jsonl)
        self.decisions: list[dict] = []
        # What each decision was made from (`replay`), where asked: a simulation keeps them, a server does not.
        self.inputs: Optional[list[dict]] = [] if keep_inputs else None
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
        if self.inputs is not None:
            self.inputs.append({"time_s": time_s, "window": dataclasses.asdict(window),
                                "current": [current.prefill_share, current.decode_share]})
        d = self.partitioner.step(time_s, window, current)
        self.record(d.row())
        return d

    @staticmethod
    def replay(engine_cfg, cores: Optional[Sequence[int]], inputs: Sequence[dict],
               decisions: Sequence[dict]) -> Optional[list[dict]]:
        """The decisions `engine_cfg`'s controller makes from another run's `inputs` (its windows and partitions),
        or None as soon as one moves to another partition than that run's `decisions` did. Until a controller
        decides differently its run is the same (a decision is the only way the controller acts on the engine),
        so when none does, the other run is this one's, step for step: a sweep over the SLOs simulates a
        `semipd_dynamic` run once for all the SLOs its controller does not tell apart."""
        if len(inputs) != len(decisions):
            return None
        part = make_partitioner(engine_cfg, cores)
        rows = []
        for x, done in zip(inputs, decisions):
            d = part.step(x["time_s"], Window(**x["window"]), Partition(*x["current"]))
            if (d.new.prefill_share, d.new.decode_share) != (done["prefill_share"], done["decode_share"]):
                return None
            rows.append(d.row())
        return rows

    def record(self, row: dict) -> None:
        self.decisions.append(row)
        if self.log_path:
            with open(self.log_path, "a") as f:
                f.write(json.dumps(row) + "\n")
