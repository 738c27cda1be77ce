"""The server's handle on an engine: worker processes, request routing, outputs.

An engine (unified, disagg, semi-PD, ...) is a subclass that says which workers
it runs (`worker_specs`) and where a new request goes (`entry_worker`). The
rest (spawning, readiness, fan-in of outputs into per-request asyncio queues,
aborts, crash detection, shutdown) is shared.
"""

from __future__ import annotations

import asyncio
import logging
import multiprocessing as mp
import queue
import threading
import time
from collections.abc import Callable
from typing import Optional

from semipd_engine.request import Request, RequestOutput
from semipd_engine.worker import WorkerSpec, worker_main

log = logging.getLogger(__name__)


class EngineDead(RuntimeError):
    pass


class EngineClient:
    name = "base"

    def __init__(self, model_cfg, engine_cfg):
        self.model_cfg, self.engine_cfg = model_cfg, engine_cfg
        self._ctx = mp.get_context("spawn")
        self._out_q = self._ctx.Queue()
        self._in_qs: dict[str, object] = {}
        self._procs: dict[str, mp.Process] = {}
        self.worker_info: dict[str, dict] = {}
        self._streams: dict[str, asyncio.Queue] = {}
        self._loop: Optional[asyncio.AbstractEventLoop] = None
        self._reader: Optional[threading.Thread] = None
        self._stopping = False
        self.dead_reason: Optional[str] = None
        self.on_stats: Callable[[str, object], None] = lambda worker, stats: None

    # -- engine-specific ------------------------------------------------------
    def worker_specs(self) -> list[WorkerSpec]:
        raise NotImplementedError

    def entry_worker(self, req: Request) -> str:
        return self.worker_specs()[0].name

    # -- lifecycle --------------------------------------------------------------
    async def start(self, timeout_s: float) -> None:
        self._loop = asyncio.get_running_loop()
        for spec in self.worker_specs():
            q = self._ctx.Queue()
            p = self._ctx.Process(target=worker_main, name=f"worker-{spec.name}",
                                  args=(spec, self.model_cfg, self.engine_cfg, q, self._out_q), daemon=True)
            p.start()
            self._in_qs[spec.name], self._procs[spec.name] = q, p
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
            if msg[0] == "ready":
                self.worker_info[msg[1]] = msg[2]
                log.info("worker %s ready: %s", msg[1], msg[2])
            elif msg[0] == "fatal":
                raise EngineDead(f"worker {msg[1]} failed at start-up:\n{msg[2]}")
        self._reader = threading.Thread(target=self._read_loop, name="engine-reader", daemon=True)
        self._reader.start()

    @property
    def ready(self) -> bool:
        return self._reader is not None and self.dead_reason is None and not self._stopping

    @property
    def max_model_len(self) -> int:
        return min(i["max_model_len"] for i in self.worker_info.values())

    def pids(self) -> dict[str, int]:
        return {n: p.pid for n, p in self._procs.items()}

    async def shutdown(self, timeout_s: float = 5.0) -> None:
        self._stopping = True
        for q in self._in_qs.values():
            q.put(("shutdown",))
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
        self._in_qs[self.entry_worker(req)].put(("add", req))
        return stream

    def abort(self, request_id: str) -> None:
        if self._streams.pop(request_id, None) is None:
            return
        for q in self._in_qs.values():  # the request may have moved between workers
            q.put(("abort", request_id))

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
        if msg[0] == "step":
            _, worker, outputs, stats = msg
            if stats is not None:
                self.on_stats(worker, stats)
            for out in outputs:
                stream = self._streams.get(out.request_id)
                if stream is None:
                    continue  # aborted meanwhile
                stream.put_nowait(out)
                if out.finished:
                    self._streams.pop(out.request_id, None)
        elif msg[0] == "fatal":
            self._mark_dead(f"worker {msg[1]} crashed:\n{msg[2]}")

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
