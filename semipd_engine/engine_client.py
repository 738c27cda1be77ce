"""The server's handle on an engine: worker processes, request routing, outputs.

An engine (unified, disagg, semi-PD, ...) is a subclass that says which workers
it runs (`worker_specs`) and where a new request goes (`entry_worker`). The
rest (spawning, readiness, fan-in of outputs into per-request asyncio queues,
aborts, crash detection and recovery, shutdown) is shared. Engines know nothing of HTTP: what
the server may expose beyond generation is a typed capability
(`partition_control`, `controller`), None where an engine has none.
"""

from __future__ import annotations

import asyncio
import logging
import os
import queue
import threading
import time
from collections import deque
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
    WorkersRestarted,
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
    """The server's side of an engine.

    States: created -> starting -> ready <-> restarting, -> dead (start-up failed, or no restarts
    left), -> stopping. When a worker dies (an exception it could not contain, a kill -9) every
    in-flight request is failed at once and the engine replaces *all* its workers, with fresh
    queues: a process killed mid-write can leave a torn message in a queue, or hold a queue's
    or the shared allocator's lock forever, so nothing the dead worker touched is reused. What
    the engine owns in this process (semi-PD's weights and KV pool) survives; shared allocators
    are made whole by `reset_shared` (no request holds a block once all were failed).
    """

    name = "base"
    RESTART_WINDOW_S = 60.0

    def __init__(self, model_cfg, engine_cfg):
        self.model_cfg, self.engine_cfg = model_cfg, engine_cfg
        self.name = engine_cfg.name  # the configured engine (unified and unified_chunked share a class)
        # torch's spawn context: tensors (shared weights, the KV pool) travel as shared memory.
        self._ctx = tmp.get_context("spawn")
        self._out_q = None
        self._in_qs: dict[str, object] = {}
        self._procs: dict[str, object] = {}
        self._gen = 0  # worker generation: messages and threads of replaced workers are ignored
        self.state = "created"
        self.worker_info: dict[str, dict] = {}
        self._pool_labels: dict[str, str] = {}
        self._streams: dict[str, asyncio.Queue] = {}
        # Outputs of one request can come from two workers through two queue feeders:
        # deliver them in token order.
        self._next: dict[str, int] = {}
        self._held: dict[str, dict[int, RequestOutput]] = {}
        self._loop: Optional[asyncio.AbstractEventLoop] = None
        self._monitor: Optional[threading.Thread] = None
        self._restart_task: Optional[asyncio.Task] = None
        self._restart_times: deque[float] = deque()
        self._startup_timeout_s = 300.0
        self.dead_reason: Optional[str] = None
        self.restart_reason: Optional[str] = None
        self.restarts = 0
        self.last_restart: Optional[dict] = None
        self.on_stats: Callable[[str, object], None] = lambda worker, stats: None
        # Worker events (ShareSwitched, KVTransferred), restarts and the controller's decisions, for the metrics.
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

    def reset_shared(self) -> None:
        """Before replacement workers start: make state shared with the old ones whole again (in a thread)."""

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
        self._startup_timeout_s = timeout_s
        self.state = "starting"
        await asyncio.to_thread(self.prepare)
        try:
            await self._spawn(timeout_s)
        except EngineDead as e:
            self.state, self.dead_reason = "dead", str(e)
            raise
        self.state = "ready"
        self._monitor = threading.Thread(target=self._monitor_loop, name="engine-monitor", daemon=True)
        self._monitor.start()

    async def _spawn(self, timeout_s: float) -> None:
        """Start one generation of workers with fresh queues; returns once every one is ready."""
        specs = self.worker_specs()
        self._gen += 1
        gen = self._gen
        self._out_q = out_q = self._ctx.Queue()
        self._in_qs = {spec.name: self._ctx.Queue() for spec in specs}
        self._pool_labels = {spec.name: spec.pool or spec.name for spec in specs}
        self.roles = {spec.name: spec.role for spec in specs}
        self._procs = {}
        for spec in specs:
            # Spawned from the event-loop thread: the workers' parent-death signal is tied to it.
            p = self._ctx.Process(target=worker_main, name=f"worker-{spec.name}", daemon=True,
                                  args=(spec, self.model_cfg, self.engine_cfg, self._in_qs[spec.name], out_q),
                                  kwargs={**self.worker_kwargs(spec), "parent_pid": os.getpid()})
            p.start()
            self._procs[spec.name] = p
        info: dict[str, dict] = {}
        deadline = time.monotonic() + timeout_s
        while len(info) < len(self._procs):
            if time.monotonic() > deadline:
                raise TimeoutError(f"engine workers not ready after {timeout_s}s")
            msg = await asyncio.to_thread(self._get, out_q, 0.2)
            if msg is None:
                dead = self._dead_worker(self._procs)
                if dead:
                    raise EngineDead(dead)
                continue
            if isinstance(msg, WorkerReady):
                info[msg.worker] = msg.info
                log.info("worker %s ready: %s", msg.worker, msg.info)
            elif isinstance(msg, WorkerFailed):
                raise EngineDead(f"worker {msg.worker} failed at start-up:\n{msg.traceback}")
        self.worker_info = info
        threading.Thread(target=self._read_loop, args=(gen, out_q), name=f"engine-reader-{gen}",
                         daemon=True).start()

    @property
    def ready(self) -> bool:
        return self.state == "ready"

    @property
    def max_model_len(self) -> int:
        return min(i["max_model_len"] for i in self.worker_info.values())

    def status(self) -> dict:
        """What /health reports beyond up or down."""
        out: dict = {"state": self.state, "restarts": self.restarts}
        if self.last_restart is not None:
            out["last_restart"] = self.last_restart
        reason = self.dead_reason if self.state == "dead" else (
            self.restart_reason if self.state == "restarting" else None)
        if reason:
            out["reason"] = reason
        return out

    async def shutdown(self, timeout_s: float = 5.0) -> None:
        self.state = "stopping"
        if self._restart_task is not None:
            self._restart_task.cancel()
        for q in self._in_qs.values():
            self._put(q, Shutdown())
        deadline = time.monotonic() + timeout_s
        for p in self._procs.values():
            await asyncio.to_thread(p.join, max(0.1, deadline - time.monotonic()))
            if p.is_alive():
                p.kill()
                p.join(1)
        self._fail_all("server shutting down", reason="abort")

    # -- failure and recovery -------------------------------------------------------
    def _worker_died(self, gen: int, reason: str) -> None:
        """On the event loop: a worker of generation `gen` is gone (or reported a crash)."""
        if gen != self._gen or self.state != "ready":
            return  # already handled, or the engine is stopping
        log.error("engine %s: %s", self.name, reason)
        self._gen += 1  # from now on, whatever the failed generation still sends is dropped
        short = reason.strip().splitlines()[0]
        self._fail_all(f"engine worker failed: {short}")
        now = time.monotonic()
        while self._restart_times and now - self._restart_times[0] > self.RESTART_WINDOW_S:
            self._restart_times.popleft()
        budget = self.engine_cfg.max_worker_restarts
        if len(self._restart_times) >= budget:
            self.state = "dead"
            self.dead_reason = short if budget <= 0 else \
                f"{short} (no restarts left: {budget} within {self.RESTART_WINDOW_S:.0f}s)"
            self._restart_task = self._loop.create_task(self._stop_workers())
            return
        self._restart_times.append(now)
        self.state, self.restart_reason = "restarting", short
        self._restart_task = self._loop.create_task(self._restart(short, now))

    async def _restart(self, reason: str, t0: float) -> None:
        try:
            await self._stop_workers()
            await asyncio.to_thread(self.reset_shared)
            await self._spawn(self._startup_timeout_s)
        except asyncio.CancelledError:
            raise
        except Exception as e:  # the replacement failed too: stay down, say why
            log.exception("engine %s: replacing the workers failed", self.name)
            if self.state == "restarting":
                self.state, self.dead_reason = "dead", f"{reason}; restart failed: {type(e).__name__}: {e}"
            await self._stop_workers()
            return
        if self.state != "restarting":
            return
        seconds = time.monotonic() - t0
        self.restarts += 1
        self.last_restart = {"reason": reason, "seconds": round(seconds, 3), "unix_time": round(time.time(), 3)}
        self.state, self.restart_reason = "ready", None
        log.warning("engine %s: workers replaced in %.2fs (restart %d) after: %s", self.name, seconds,
                    self.restarts, reason)
        self.on_event(WorkersRestarted(reason, seconds, self.restarts, dict(self.worker_info)))

    async def _stop_workers(self) -> None:
        """Kill every worker of the current generation; their queues are abandoned."""
        procs, in_qs = self._procs, self._in_qs
        self._in_qs = {}
        for p in procs.values():
            if p.is_alive():
                p.kill()
        for p in procs.values():
            await asyncio.to_thread(p.join, 5.0)
        for q in in_qs.values():
            q.cancel_join_thread()  # a feeder blocked on a dead reader must not hold up exit
            q.close()

    @staticmethod
    def _dead_worker(procs: dict) -> Optional[str]:
        for name, p in procs.items():
            if not p.is_alive():
                return f"worker {name} (pid {p.pid}) exited with code {p.exitcode}"
        return None

    def _monitor_loop(self) -> None:
        """Notice a dead worker within milliseconds (process sentinels), whatever killed it."""
        from multiprocessing.connection import wait

        while self.state not in ("stopping", "dead"):
            gen, procs = self._gen, dict(self._procs)
            if self.state != "ready" or not procs:
                time.sleep(0.05)
                continue
            if not wait([p.sentinel for p in procs.values()], timeout=0.2) or gen != self._gen:
                continue
            reason = self._dead_worker(procs)
            if reason is None:
                continue
            self._call(self._worker_died, gen, reason)
            while self._gen == gen and self.state == "ready":
                time.sleep(0.02)  # until the event loop has acted on it

    def _call(self, fn, *args) -> None:
        try:
            self._loop.call_soon_threadsafe(fn, *args)
        except RuntimeError:  # the loop is closed: the server is exiting
            pass

    # -- requests ---------------------------------------------------------------
    def add(self, req: Request) -> asyncio.Queue:
        if not self.ready:
            if self.state == "restarting":
                raise EngineDead(f"engine is restarting after a worker failure ({self.restart_reason})")
            raise EngineDead(self.dead_reason or "engine is not ready")
        stream: asyncio.Queue = asyncio.Queue()
        self._streams[req.request_id] = stream
        self._next[req.request_id] = 1
        self._send(self.entry_worker(req), AddRequest(req))
        return stream

    def abort(self, request_id: str) -> None:
        if self._streams.pop(request_id, None) is None:
            return
        self._next.pop(request_id, None)
        self._held.pop(request_id, None)
        for q in self._in_qs.values():  # the request may have moved between workers
            self._put(q, AbortRequest(request_id))

    def _send(self, worker: str, msg) -> None:
        q = self._in_qs.get(worker)
        if q is not None:  # none while the workers are being replaced
            self._put(q, msg)

    @staticmethod
    def _put(q, msg) -> None:
        try:
            q.put(msg)
        except (ValueError, OSError):  # closed: its worker was replaced
            pass

    @property
    def num_in_flight(self) -> int:
        return len(self._streams)

    # -- output fan-in (reader thread -> event loop) -----------------------------
    @staticmethod
    def _get(q, timeout: float):
        try:
            return q.get(timeout=timeout)
        except queue.Empty:
            return None

    def _read_loop(self, gen: int, out_q) -> None:
        while self._gen == gen and self.state not in ("stopping", "dead"):
            try:
                msg = self._get(out_q, 0.2)
            except Exception as e:  # a worker killed mid-write can leave a torn message behind
                self._call(self._worker_died, gen, f"worker output queue broken: {type(e).__name__}: {e}")
                return
            if msg is not None:
                self._call(self._dispatch, gen, msg)

    def _dispatch(self, gen: int, msg) -> None:
        if gen != self._gen:
            return  # from workers that have been replaced
        if isinstance(msg, StepReport):
            if msg.stats is not None:
                self.observe_iteration(msg.worker, msg.stats, len(msg.outputs))
                self.on_stats(msg.worker, msg.stats)
            for out in msg.outputs:
                self._deliver(out)
        elif isinstance(msg, (ShareSwitched, KVTransferred)):
            self.on_event(msg)
        elif isinstance(msg, WorkerFailed):
            tb = msg.traceback.strip().splitlines()
            self._worker_died(gen, f"worker {msg.worker} crashed: {tb[-1] if tb else ''}\n{msg.traceback}")
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

    def _fail_all(self, error: str, reason: str = "error") -> None:
        for rid, stream in list(self._streams.items()):
            stream.put_nowait(RequestOutput(rid, (), (), True, reason, 0, 0, error=error))
        self._streams.clear()
        self._next.clear()
        self._held.clear()
