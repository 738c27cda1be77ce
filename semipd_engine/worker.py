"""A worker process: receive requests, loop schedule -> run -> postprocess, report.

Every engine is made of these. A worker's `WorkerSpec` fixes its role (which
scheduler policy it runs) and its compute share (CPU core set + thread count).
Engines whose phases run in separate workers give each worker the shared
state (one model, one KV pool, one allocator) and its peers' inboxes.

Messages in:  ("add", Request) | ("adopt", Request) | ("abort", id) | ("partition", cores, share, t_sent)
              | ("shutdown",)
              | ("transfer", Request, source) | ("release", id)
Messages out: ("ready", name, info) | ("step", name, [RequestOutput], IterationStats)
              | ("event", kind, name, info) with kind "switched" | "transferred" | ("fatal", name, traceback)
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

from semipd_engine.kv_transfer import KVReceiver
from semipd_engine.partition import apply_share

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class WorkerSpec:
    name: str
    policy: str
    cores: Optional[tuple[int, ...]] = None  # None = every core the process may use
    num_threads: int = 0  # 0 = one per core
    pool: Optional[str] = None  # metrics label of the KV pool it uses (default: its own name)
    # How a prefilled request reaches decode: "adopt" (same pool: semi-PD) or "transfer" (copy: disagg).
    handoff: str = "adopt"


@dataclass
class SharedState:
    """Memory a worker receives instead of allocating it: the same pages, no copies.

    semi-PD gives both workers the model, the pool and its allocator. The
    disaggregated baseline gives each instance only its own pool (it loads its
    own weights and owns its allocator) and, to decode instances, the prefill
    instances' pools to copy from (`sources`).
    """

    model: Any = None
    kv: Any = None
    pool: Any = None
    sources: Optional[dict[str, Any]] = None


def worker_main(spec: WorkerSpec, model_cfg, engine_cfg, in_q, out_q, shared: Optional[SharedState] = None,
                peers: Optional[dict[str, Any]] = None, engine_cfg_override=None) -> None:
    from semipd_engine.engine_core import EngineCore

    logging.basicConfig(level=logging.INFO, format=f"%(asctime)s [{spec.name}] %(levelname)s %(message)s")
    engine_cfg = engine_cfg_override or engine_cfg
    try:
        cores = apply_share("cpu_affinity" if spec.cores else "none", spec.cores or (), spec.num_threads)
        shared = shared or SharedState()
        core = EngineCore(model_cfg, engine_cfg, policy=spec.policy, model=shared.model, kv=shared.kv,
                          pool=shared.pool)
        info = dict(pid=os.getpid(), cores=cores, num_threads=torch.get_num_threads(),
                    max_model_len=core.max_model_len, kv_blocks_total=core.pool.num_blocks,
                    kv_bytes=core.kv.nbytes, block_size=core.pool.block_size)
        out_q.put(("ready", spec.name, info))
        receiver = KVReceiver(shared.sources, core.kv, core.pool) if shared.sources else None
        Worker(spec, core, in_q, out_q, peers or {}, receiver).loop()
    except Exception:
        out_q.put(("fatal", spec.name, traceback.format_exc()))
        raise


class Worker:
    def __init__(self, spec: WorkerSpec, core, in_q, out_q, peers: dict[str, Any],
                 receiver: Optional[KVReceiver] = None):
        self.spec, self.core, self.in_q, self.out_q, self.peers = spec, core, in_q, out_q, peers
        self.receiver = receiver
        # Requests prefilled here whose blocks a decode instance has not copied yet.
        self.sending: dict[str, Any] = {}
        self.decoders = sorted(n for n in peers if n.startswith("decode"))
        self.prefillers = sorted(n for n in peers if n.startswith("prefill"))
        self._rr = 0
        # Requests aborted while in transit between workers are dropped on arrival.
        self.aborted: OrderedDict[str, None] = OrderedDict()
        self.cuda = core.kv.data.is_cuda

    def busy(self) -> bool:
        return self.core.has_work() or bool(self.receiver and self.receiver.pending)

    def loop(self) -> None:
        while True:
            # Block only when idle, so a busy worker never waits on its inbox.
            try:
                msg = self.in_q.get(timeout=0.05) if not self.busy() else self.in_q.get_nowait()
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
            if self.receiver is not None:
                changed |= self.pull_transfers()
            outputs, stats = self.core.step()
            if changed and stats is None:
                stats = self.core.snapshot()  # blocks changed hands: keep /metrics true while idle
            if outputs or stats:
                self.out_q.put(("step", self.spec.name, outputs, stats))
            self.publish()

    def handle(self, msg) -> bool:
        kind = msg[0]
        if kind == "transfer":  # disaggregated: blocks to copy from a prefill instance's pool
            _, req, source = msg
            if req.request_id in self.aborted:
                self.peers[source].put(("release", req.request_id))
            else:
                self.receiver.offer(req, source)
            return False
        if kind == "release":  # disaggregated: a decode instance holds its copy now
            req = self.sending.pop(msg[1], None)
            if req is not None:
                self.core.scheduler.release(req)
            return req is not None
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
            rid = msg[1]
            self.aborted[rid] = None
            if len(self.aborted) > 10000:
                self.aborted.popitem(last=False)
            waiting = self.receiver.drop(rid) if self.receiver is not None else None
            if waiting is not None:
                self.peers[waiting.source].put(("release", rid))
            sent = self.sending.pop(rid, None)
            if sent is not None:
                self.core.scheduler.release(sent)
            return self.core.abort(rid) or sent is not None
        if kind == "partition":
            _, cores, share, t_sent = msg
            t0 = time.monotonic()
            applied = apply_share("cpu_affinity", cores)
            t1 = time.monotonic()
            self.out_q.put(("event", "switched", self.spec.name, {"share": share, "cores": applied,
                                                                  "stall_s": t1 - t0, "delay_s": t1 - t_sent}))
            return False
        raise ValueError(f"unknown worker message {kind!r}")

    def publish(self) -> None:
        """Hand prefilled requests to the decode worker, preempted ones back to prefill."""
        if not (self.core.handoffs or self.core.evicted):
            return
        if self.cuda:
            torch.cuda.current_stream().synchronize()  # KV writes complete before anyone reads them
        for req in self.core.handoffs:
            target = self.decoders[self._rr % len(self.decoders)]
            self._rr += 1
            if self.spec.handoff == "adopt":
                self.peers[target].put(("adopt", req))  # same pool: the decode worker reads the blocks in place
            else:
                self.sending[req.request_id] = req
                self.peers[target].put(("transfer", req, self.spec.name))
        for req in self.core.evicted:
            target = self.prefillers[self._rr % len(self.prefillers)]
            self._rr += 1
            self.peers[target].put(("add", req))
        self.core.handoffs.clear()
        self.core.evicted.clear()

    def pull_transfers(self) -> bool:
        done = self.receiver.pull()
        for t, nbytes, seconds in done:
            self.peers[t.source].put(("release", t.request.request_id))
            self.core.adopt(t.request)
            self.out_q.put(("event", "transferred", self.spec.name, {"bytes": nbytes, "seconds": seconds}))
        return bool(done)
