"""semipd_dynamic: the semi-PD engine steered by the SLO-aware partitioner.

The controller runs in the server process beside the engine client: it sees
every finished request's server-side TTFT and TPOT, every arrival and the
prefill worker's iteration times, and every `control_window_s` seconds asks
`SLOPartitioner` for the next partition, which the resource controller applies
(`SemiPDEngine.set_partition`). Each decision goes to /metrics and, as one JSON
line, to `engine.decision_log` (the runner saves it as the job's partition_log.jsonl).
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from typing import Optional

from semipd_engine.engine import SemiPDEngine
from semipd_engine.partition import placement
from semipd_engine.slo_partitioner import ControllerConfig, SLOPartitioner, Window

log = logging.getLogger(__name__)


class DynamicSemiPDEngine(SemiPDEngine):
    name = "semipd_dynamic"

    def __init__(self, model_cfg, engine_cfg):
        super().__init__(model_cfg, engine_cfg)
        e = engine_cfg
        self.partitioner = SLOPartitioner(
            ControllerConfig(e.slo_ttft_s, e.slo_tpot_s, e.slo_percentile, e.step_size, e.max_step, e.min_share,
                             e.max_share),
            distinct=lambda a, b: placement(a, self.cores) != placement(b, self.cores),
        )
        self.decisions: list[dict] = []
        self._reset_window(time.monotonic())
        self._task: Optional[asyncio.Task] = None
        self._t_start = time.monotonic()

    @property
    def controller(self) -> SLOPartitioner:
        return self.partitioner

    def _reset_window(self, now: float) -> None:
        self._w_start, self._ttfts, self._tpots = now, [], []
        self._arrivals, self._busy, self._prefilled = 0, 0.0, 0

    # -- observations -----------------------------------------------------------------
    def add(self, req):
        stream = super().add(req)
        self._arrivals += 1
        return stream

    def observe_request(self, arrival, first_token, finished, output_tokens) -> None:
        if first_token is None:
            return
        self._ttfts.append(first_token - arrival)
        if output_tokens > 1:
            self._tpots.append((finished - first_token) / (output_tokens - 1))

    def observe_iteration(self, worker, stats, num_outputs) -> None:
        if self.roles.get(worker) == "prefill" and stats.num_prefill_tokens:
            self._busy += stats.duration_s
            self._prefilled += num_outputs  # a prefill worker's output is a request done prefilling

    # -- control loop -------------------------------------------------------------------
    async def start(self, timeout_s: float) -> None:
        await super().start(timeout_s)
        self._t_start = time.monotonic()
        self._reset_window(self._t_start)
        self._log(self.controller_row("start"))
        self._task = asyncio.create_task(self._control_loop())

    def controller_row(self, reason: str) -> dict:
        return {"time_s": time.monotonic() - self._t_start, "prefill_share": self.partition.prefill_share,
                "decode_share": self.partition.decode_share, "reason": reason}

    async def _control_loop(self) -> None:
        while self.state not in ("stopping", "dead"):
            await asyncio.sleep(self.engine_cfg.control_window_s)
            if self.ready:  # a window that spans a worker restart is still one window
                self.control_step()

    def control_step(self) -> dict:
        now = time.monotonic()
        window = Window(now - self._w_start, self._ttfts, self._tpots, self._arrivals, self._busy, self._prefilled)
        self._reset_window(now)
        d = self.partitioner.step(now - self._t_start, window, self.partition)
        if d.new != self.partition:
            self.set_partition(d.new)
        row = d.row()
        self._log(row)
        self.on_event(d)
        return row

    def _log(self, row: dict) -> None:
        self.decisions.append(row)
        if self.engine_cfg.decision_log:
            with open(self.engine_cfg.decision_log, "a") as f:
                f.write(json.dumps(row) + "\n")

    async def shutdown(self, timeout_s: float = 5.0) -> None:
        if self._task is not None:
            self._task.cancel()
        await super().shutdown(timeout_s)
