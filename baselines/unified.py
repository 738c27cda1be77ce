"""The unified baseline (vLLM / SGLang style): one worker runs both phases.

`unified` schedules with prefill priority, `unified_chunked` with Sarathi-style
chunked prefill; the policy comes from `engine.policy`, so the two are the
same composition with a different scheduler setting.
"""

from __future__ import annotations

from semipd_engine.engine_client import EngineClient
from semipd_engine.worker import WorkerSpec


class UnifiedEngine(EngineClient):
    name = "unified"

    def worker_specs(self) -> list[WorkerSpec]:
        return [WorkerSpec("unified", self.engine_cfg.policy, "both", None, self.engine_cfg.num_threads)]
