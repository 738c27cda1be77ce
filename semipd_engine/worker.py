"""A worker process: receive requests, loop schedule -> run -> postprocess, report.

Every engine is made of these. A worker's `WorkerSpec` fixes its role (which
scheduler policy it runs) and its compute share (CPU core set + thread count).
Messages in: ("add", Request) | ("abort", id) | ("shutdown",).
Messages out: ("ready", name, info) | ("step", name, [RequestOutput], IterationStats)
| ("fatal", name, traceback).
"""

from __future__ import annotations

import logging
import os
import queue
import traceback
from dataclasses import dataclass
from typing import Optional

import torch

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class WorkerSpec:
    name: str
    policy: str
    cores: Optional[tuple[int, ...]] = None  # None = every core the process may use
    num_threads: int = 0  # 0 = one per core


def apply_compute_share(cores: Optional[tuple[int, ...]], num_threads: int) -> tuple[int, ...]:
    """Pin this process to `cores` and size torch's intra-op pool to match."""
    if cores:
        os.sched_setaffinity(0, cores)
    allowed = tuple(sorted(os.sched_getaffinity(0)))
    torch.set_num_threads(num_threads or len(allowed))
    return allowed


def worker_main(spec: WorkerSpec, model_cfg, engine_cfg, in_q, out_q) -> None:
    from semipd_engine.engine_core import EngineCore

    logging.basicConfig(level=logging.INFO, format=f"%(asctime)s [{spec.name}] %(levelname)s %(message)s")
    try:
        cores = apply_compute_share(spec.cores, spec.num_threads)
        core = EngineCore(model_cfg, engine_cfg, policy=spec.policy)
        info = dict(pid=os.getpid(), cores=cores, num_threads=torch.get_num_threads(),
                    max_model_len=core.max_model_len, kv_blocks_total=core.pool.num_blocks,
                    kv_bytes=core.kv.nbytes, block_size=core.pool.block_size)
        out_q.put(("ready", spec.name, info))
        _loop(spec, core, in_q, out_q)
    except Exception:
        out_q.put(("fatal", spec.name, traceback.format_exc()))
        raise


def _loop(spec: WorkerSpec, core, in_q, out_q) -> None:
    while True:
        # Block only when idle, so a busy worker never waits on its inbox.
        try:
            msg = in_q.get(timeout=0.05) if not core.has_work() else in_q.get_nowait()
        except queue.Empty:
            msg = None
        aborted = False
        while msg is not None:
            if msg[0] == "shutdown":
                return
            if msg[0] == "add":
                core.add_request(msg[1])
            elif msg[0] == "abort":
                aborted |= core.abort(msg[1])
            try:
                msg = in_q.get_nowait()
            except queue.Empty:
                msg = None
        outputs, stats = core.step()
        if aborted and stats is None:
            stats = core.snapshot()  # an abort freed blocks: keep /metrics true while idle
        if outputs or stats:
            out_q.put(("step", spec.name, outputs, stats))
