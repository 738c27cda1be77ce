"""A worker process: receive requests, loop schedule -> run -> postprocess, report.

Every engine is made of these. A worker's `WorkerSpec` fixes its role (which
scheduler policy it runs) and its compute share (CPU core set + thread count).
Engines whose phases run in separate workers give each worker the shared
state (one model, one KV pool, one allocator) and its peers' inboxes.

Messages in:  ("add", Request) | ("adopt", Request) | ("abort", id) | ("partition", cores, share, t_sent)
              | ("shutdown",)
Messages out: ("ready", name, info) | ("step", name, [RequestOutput], IterationStats)
              | ("switched", name, info) | ("fatal", name, traceback)
"""

from __future__ import annotations

import logging
import os
import queue
import time
import traceback
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Optional

import torch

from semipd_engine.partition import apply_share

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class WorkerSpec:
    name: str
    policy: str
    cores: Optional[tuple[int, ...]] = None  # None = every core the process may use
    num_threads: int = 0  # 0 = one per core
    pool: Optional[str] = None  # metrics label of the KV pool it uses (default: its own name)


@dataclass
class SharedState:
    """What a resident owner hands its workers: no copies, the same memory."""

    model: Any
    kv: Any
    pool: Any


def worker_main(spec: WorkerSpec, model_cfg, engine_cfg, in_q, out_q, shared: Optional[SharedState] = None,
                peers: Optional[dict[str, Any]] = None) -> None:
    from semipd_engine.engine_core import EngineCore

    logging.basicConfig(level=logging.INFO, format=f"%(asctime)s [{spec.name}] %(levelname)s %(message)s")
    try:
        cores = apply_share("cpu_affinity" if spec.cores else "none", spec.cores or (), spec.num_threads)
        if shared is not None:
            core = EngineCore(model_cfg, engine_cfg, policy=spec.policy, model=shared.model, kv=shared.kv,
                              pool=shared.pool)
        else:
            core = EngineCore(model_cfg, engine_cfg, policy=spec.policy)
        info = dict(pid=os.getpid(), cores=cores, num_threads=torch.get_num_threads(),
                    max_model_len=core.max_model_len, kv_blocks_total=core.pool.num_blocks,
                    kv_bytes=core.kv.nbytes, kv_data_ptr=core.kv.data.data_ptr(), block_size=core.pool.block_size)
        out_q.put(("ready", spec.name, info))
        Worker(spec, core, in_q, out_q, peers or {}).loop()
    except Exception:
        out_q.put(("fatal", spec.name, traceback.format_exc()))
        raise


class Worker:
    def __init__(self, spec: WorkerSpec, core, in_q, out_q, peers: dict[str, Any]):
        self.spec, self.core, self.in_q, self.out_q, self.peers = spec, core, in_q, out_q, peers
        # Requests aborted while in transit between workers are dropped on arrival.
        self.aborted: OrderedDict[str, None] = OrderedDict()
        self.cuda = core.kv.data.is_cuda

    def loop(self) -> None:
        while True:
            # Block only when idle, so a busy worker never waits on its inbox.
            try:
                msg = self.in_q.get(timeout=0.05) if not self.core.has_work() else self.in_q.get_nowait()
            except queue.Empty:
                msg = None
            changed = False
            while msg is not None:
                if msg[0] == "shutdown":
                    return
                changed |= self.handle(msg)
                try:
                    msg = self.in_q.get_nowait()
                except queue.Empty:
                    msg = None
            outputs, stats = self.core.step()
            if changed and stats is None:
                stats = self.core.snapshot()  # blocks changed hands: keep /metrics true while idle
            if outputs or stats:
                self.out_q.put(("step", self.spec.name, outputs, stats))
            self.publish()

    def handle(self, msg) -> bool:
        kind = msg[0]
        if kind in ("add", "adopt"):
            req = msg[1]
            if req.request_id in self.aborted:
                self.core.scheduler.release(req)
                return True
            if kind == "add":
                self.core.add_request(req)
            else:
                self.core.adopt(req)
            return False
        if kind == "abort":
            self.aborted[msg[1]] = None
            if len(self.aborted) > 10000:
                self.aborted.popitem(last=False)
            return self.core.abort(msg[1])
        if kind == "partition":
            _, cores, share, t_sent = msg
            t0 = time.monotonic()
            applied = apply_share("cpu_affinity", cores)
            t1 = time.monotonic()
            self.out_q.put(("switched", self.spec.name, {"share": share, "cores": applied, "stall_s": t1 - t0,
                                                         "delay_s": t1 - t_sent}))
            return False
        raise ValueError(f"unknown worker message {kind!r}")

    def publish(self) -> None:
        """Hand prefilled requests to the decode worker, preempted ones back to prefill."""
        if not (self.core.handoffs or self.core.evicted):
            return
        if self.cuda:
            torch.cuda.current_stream().synchronize()  # KV writes complete before anyone reads them
        for req in self.core.handoffs:
            self.peers["decode"].put(("adopt", req))
        for req in self.core.evicted:
            self.peers["prefill"].put(("add", req))
        self.core.handoffs.clear()
        self.core.evicted.clear()
