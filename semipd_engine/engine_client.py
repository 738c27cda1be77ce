"""The server's handle on an engine: worker processes, request routing, outputs.

An engine (unified, disagg, semi-PD, ...) is a subclass that says which workers
it runs (`worker_specs`) and where a new request goes (`entry_worker`). The
rest (spawning, readiness, fan-in of outputs into per-request asyncio queues,
aborts, crash detection, shutdown) is shared. Engines know nothing of HTTP: what
the server may expose beyond generation is a typed capability
(`partition_control`, `controller`), None where an engine has none.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from collections.abc import Callable
from typing import Optional, Protocol

import torch.multiprocessing as tmp

from semipd_engine.messages import (
    AbortRequest,
    AddRequest,
    KVTransferred,
    ShareSwitched,
    Shutdown,
    StepReport,
    WorkerFailed,
    WorkerReady,
)
from semipd_engine.partition import Partition
from semipd_engine.request import Request, RequestOutput
from semipd_engine.worker import WorkerSpec, worker_main

log = logging.getLogger(__name__)


class EngineDead(RuntimeError):
    pass


class PartitionControl(Protocol):
    """Run-time control of semi-PD's compute shares."""

    @property
    def partition(self) -> Partition: ...

    def describe(self) -> dict: ...

    def set_partition(self, p: Partition) -> dict: ...


class EngineClient:
    name = "base"

    def __init__(self, model_cfg, engine_cfg):
        self.model_cfg, self.engine_cfg = model_cfg, engine_cfg
        # torch's spawn context: tensors (shared weights, the KV pool) travel as shared memory.
        self._ctx = tmp.get_context("spawn")
        self._out_q = self._ctx.Queue()
        self._in_qs: dict[str, object] = {}
        self._procs: dict[str, object] = {}
        self.worker_info: dict[str, dict] = {}
        self._pool_labels: dict[str, str] = {}
        self._streams: dict[str, asyncio.Queue] = {}
        # Outputs of one request can come from two workers through two queue feeders:
        # deliver them in token order.
        self._next: dict[str, int] = {}
        self._held: dict[str, dict[int, RequestOutput]] = {}
        self._loop: Optional[asyncio.AbstractEventLoop] = None
        self._reader: Optional[threading.Thread] = None
        self._stopping = False
        self.dead_reason: Optional[str] = None
        self.on_stats: Callable[[str, object], None] = lambda worker, stats: None
        # Worker events (ShareSwitched, KVTransferred) and the controller's decisions, for the server's metrics.
        self.on_event: Callable[[object], None] = lambda event: None
        self.roles: dict[str, str] = {}

    # -- capabilities the server may expose (typed; None where the engine has none) --------
    @property
    def partition_control(self) -> Optional[PartitionControl]:
        return None

    @property
    def controller(self) -> Optional[object]:
        """The SLO-aware partitioner, for engines steered by one."""
        return None

    # -- engine-specific ------------------------------------------------------
    def worker_specs(self) -> list[WorkerSpec]:
        raise NotImplementedError

    def entry_worker(self, req: Request) -> str:
        return self.worker_specs()[0].name

    def prepare(self) -> None:
        """Build state the workers share (runs in a thread before they are spawned)."""

    def worker_kwargs(self, spec: WorkerSpec) -> dict:
        return {}

    def observe_request(self, arrival: float, first_token: Optional[float], finished: float,
                        output_tokens: int) -> None:
        """A request finished (server-side times); engines that steer on latency override this."""

    def observe_iteration(self, worker: str, stats, num_outputs: int) -> None:
        """A worker iteration finished; engines that steer on iteration times override this."""

    def pool_label(self, worker: str) -> str:
        """The metrics label of the KV pool a worker uses (semi-PD's workers share one)."""
        return self._pool_labels.get(worker, worker)

    # -- lifecycle --------------------------------------------------------------
    async def start(self, timeout_s: float) -> None:
        self._loop = asyncio.get_running_loop()
        specs = self.worker_specs()
        self._in_qs = {spec.name: self._ctx.Queue() for spec in specs}
        self._pool_labels = {spec.name: spec.pool or spec.name for spec in specs}
        self.roles = {spec.name: spec.role for spec in specs}
        await asyncio.to_thread(self.prepare)
        for spec in specs:
            p = self._ctx.Process(target=worker_main, name=f"worker-{spec.name}", daemon=True,
                                  args=(spec, self.model_cfg, self.engine_cfg, self._in_qs[spec.name], self._out_q),
                                  kwargs=self.worker_kwargs(spec))
            p.start()
            self._procs[spec.name] = p
        deadline = time.monotonic() + timeout_s
        while len(self.worker_info) < len(self._procs):
            if time.monotonic() > deadline:
                raise TimeoutError(f"engine workers not ready after {timeout_s}s")
            msg = await asyncio.to_thread(self._get, 0.2)
            if msg is None:
                self._check_alive()
                if self.dead_reason:
                    raise EngineDead(self.dead_reason)
                continue
            if isinstance(msg, WorkerReady):
                self.worker_info[msg.worker] = msg.info
                log.info("worker %s ready: %s", msg.worker, msg.info)
            elif isinstance(msg, WorkerFailed):
                raise EngineDead(f"worker {msg.worker} failed at start-up:\n{msg.traceback}")
        self._reader = threading.Thread(target=self._read_loop, name="engine-reader", daemon=True)
        self._reader.start()

    @property
    def ready(self) -> bool:
        return self._reader is not None and self.dead_reason is None and not self._stopping

    @property
    def max_model_len(self) -> int:
        return min(i["max_model_len"] for i in self.worker_info.values())

    async def shutdown(self, timeout_s: float = 5.0) -> None:
        self._stopping = True
        for q in self._in_qs.values():
            q.put(Shutdown())
        deadline = time.monotonic() + timeout_s
        for p in self._procs.values():
            await asyncio.to_thread(p.join, max(0.1, deadline - time.monotonic()))
            if p.is_alive():
                p.kill()
                p.join(1)
        self._fail_all("server shutting down", reason="abort")

    # -- requests ---------------------------------------------------------------
    def add(self, req: Request) -> asyncio.Queue:
        if not self.ready:
            raise EngineDead(self.dead_reason or "engine is not ready")
        stream: asyncio.Queue = asyncio.Queue()
        self._streams[req.request_id] = stream
        self._next[req.request_id] = 1
        self._in_qs[self.entry_worker(req)].put(AddRequest(req))
        return stream

    def abort(self, request_id: str) -> None:
        if self._streams.pop(request_id, None) is None:
            return
        self._next.pop(request_id, None)
        self._held.pop(request_id, None)
        for q in self._in_qs.values():  # the request may have moved between workers
            q.put(AbortRequest(request_id))

    @property
    def num_in_flight(self) -> int:
        return len(self._streams)

    # -- output fan-in (reader thread -> event loop) -----------------------------
    def _get(self, timeout: float):
        try:
            return self._out_q.get(timeout=timeout)
        except queue.Empty:
            return None

    def _read_loop(self) -> None:
        while not self._stopping:
            msg = self._get(0.2)
            if msg is None:
                self._check_alive()
                continue
            self._loop.call_soon_threadsafe(self._dispatch, msg)

    def _dispatch(self, msg) -> None:
        if isinstance(msg, StepReport):
            if msg.stats is not None:
                self.observe_iteration(msg.worker, msg.stats, len(msg.outputs))
                self.on_stats(msg.worker, msg.stats)
            for out in msg.outputs:
                self._deliver(out)
        elif isinstance(msg, (ShareSwitched, KVTransferred)):
            self.on_event(msg)
        elif isinstance(msg, WorkerFailed):
            self._mark_dead(f"worker {msg.worker} crashed:\n{msg.traceback}")
        else:
            log.error("unexpected message from a worker: %r", msg)

    def _deliver(self, out: RequestOutput) -> None:
        rid = out.request_id
        stream = self._streams.get(rid)
        if stream is None:
            return  # aborted meanwhile
        held = self._held.setdefault(rid, {})
        held[out.num_output_tokens - len(out.new_token_ids) + 1] = out  # index of its first token
        while self._next.get(rid) in held:
            nxt = held.pop(self._next[rid])
            stream.put_nowait(nxt)
            self._next[rid] += len(nxt.new_token_ids)
            if nxt.finished:
                self._streams.pop(rid, None)
                self._next.pop(rid, None)
                self._held.pop(rid, None)
                return
        if not held:
            self._held.pop(rid, None)

    def _check_alive(self) -> None:
        if self._stopping or self.dead_reason:
            return
        for name, p in self._procs.items():
            if not p.is_alive():
                reason = f"worker {name} (pid {p.pid}) exited with code {p.exitcode}"
                if self._loop is not None and self._reader is not None:
                    self._loop.call_soon_threadsafe(self._mark_dead, reason)
                else:
                    self.dead_reason = reason
                return

    def _mark_dead(self, reason: str) -> None:
        if self.dead_reason is None:
            log.error("engine failed: %s", reason)
            self.dead_reason = reason
        self._fail_all(reason)

    def _fail_all(self, error: str, reason: str = "error") -> None:
        for rid, stream in list(self._streams.items()):
            stream.put_nowait(RequestOutput(rid, (), (), True, reason, 0, 0, error=error))
        self._streams.clear()
        self._next.clear()
        self._held.clear()
