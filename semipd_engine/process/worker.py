"""A worker process: receive messages, loop `core.step()`, report.

Every real engine is made of these. A worker's `WorkerSpec` fixes its role
(which policy it runs), its compute share (CPU core set + thread count), how
prefilled requests leave it (`handoff`) and which peers it sends them to.
Engines whose phases run in separate workers give each worker shared memory
(one model, one KV pool, one allocator) instead of letting it build its own.
"""

from __future__ import annotations

import ctypes
import logging
import os
import queue
import signal
import sys
import time
import traceback
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Optional

from semipd_engine.core.handoff import HANDOFFS, Handoff
from semipd_engine.core.messages import (
    AbortRequest,
    AddRequest,
    AdoptRequest,
    HandOver,
    OfferKV,
    ReleaseKV,
    ResetPrefixCache,
    Retired,
    SetShare,
    ShareSwitched,
    Shutdown,
    StandbyFailed,
    StandbyReady,
    StepReport,
    WorkerFailed,
    WorkerReady,
    WorkerState,
)
from semipd_engine.shares.partition import apply_share
from semipd_engine.shares.sm_share import MPS_PERCENTAGE_ENV

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class WorkerSpec:
    name: str
    policy: str
    role: str = "both"  # "prefill" | "decode" | "both": what the engine client observes it as
    cores: Optional[tuple[int, ...]] = None  # None = every core the process may use
    num_threads: int = 0  # 0 = one per core
    pool: Optional[str] = None  # metrics label of the KV pool it uses (default: its own name)
    handoff: Optional[str] = None  # how prefilled requests leave: "adopt" | "transfer" (semipd_engine.core.handoff)
    decode_peers: tuple[str, ...] = ()  # where hand-offs go (round robin)
    prefill_peers: tuple[str, ...] = ()  # where evicted requests go back to
    sm_backend: str = "none"  # "green_context": its kernels run on a green context of `share` % of the SMs
    share: int = 100


PR_SET_PDEATHSIG = 1  # linux/prctl.h


def die_with_parent(parent_pid: Optional[int]) -> None:
    """Make sure this process does not outlive the one that started it (the server).

    On Linux the kernel sends SIGKILL when the parent goes, whatever killed it (even kill -9,
    which runs no cleanup). The worker loop also compares os.getppid() with `parent_pid` (other
    platforms, and a parent that died before prctl ran).
    """
    if sys.platform.startswith("linux"):
        try:
            libc = ctypes.CDLL(None, use_errno=True)
            if libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) != 0:
                log.warning("prctl(PR_SET_PDEATHSIG) failed: errno %d", ctypes.get_errno())
        except (OSError, AttributeError) as e:
            log.warning("prctl unavailable (%s): relying on the parent liveness check", e)
    if parent_pid is not None and os.getppid() != parent_pid:
        os._exit(1)  # the parent is already gone


def worker_main(spec: WorkerSpec, model_cfg, engine_cfg, in_q, out_q, state=None,
                peers: Optional[dict[str, Any]] = None, sources: Optional[dict[str, Any]] = None,
                parent_pid: Optional[int] = None, executor_wrapper=None, standby=None) -> None:
    """Build the worker's core and run its loop. With `standby` (a queue), it is a successor started with a new
    share: once built it says so (`StandbyReady`) and waits there for its predecessor's state (`TakeOver`) before
    it reads `in_q`, which it shares with the predecessor."""
    die_with_parent(parent_pid)
    import torch

    from semipd_engine.core.kv_transfer import TensorBlockCopy
    from semipd_engine.runtime.factory import build_core

    logging.basicConfig(level=logging.INFO, format=f"%(asctime)s [{spec.name}] %(levelname)s %(message)s")
    try:
        cores = apply_share("cpu_affinity" if spec.cores else "none", spec.cores or (), spec.num_threads)
        core = build_core(model_cfg, engine_cfg, spec.policy, state)
        if executor_wrapper is not None:
            core.executor = executor_wrapper(core.executor)
        sm = None
        if spec.sm_backend == "green_context":
            from semipd_engine.shares.sm_share import GreenContextShare, TorchGreenContexts

            sm = GreenContextShare(TorchGreenContexts(torch.cuda.current_device()))
            sm.apply(spec.share)
        kv = core.executor.kv
        info = dict(pid=os.getpid(), cores=cores, num_threads=torch.get_num_threads(), sms=sm.sms if sm else 0,
                    max_model_len=core.max_model_len, kv_blocks_total=core.pool.num_blocks,
                    kv_bytes=kv.nbytes, block_size=core.pool.block_size, share=spec.share)
        if MPS_PERCENTAGE_ENV in os.environ:  # what the MPS server caps this client at
            info["mps_active_thread_percentage"] = int(os.environ[MPS_PERCENTAGE_ENV])
        peers = peers or {}
        handoff = None
        if spec.handoff is not None:
            copy = TensorBlockCopy(sources, kv) if sources else None
            kwargs = {"copy": copy} if spec.handoff == "transfer" else {}
            handoff = HANDOFFS.get(spec.handoff)(spec.name, core.pool, lambda peer, m: peers[peer].put(m), **kwargs)
        worker = Worker(spec, core, in_q, out_q, peers, handoff, parent_pid, sm)
        if standby is None:
            out_q.put(WorkerReady(spec.name, info))
        else:
            out_q.put(StandbyReady(spec.name, info))
            if not worker.take_over(standby):
                return
    except Exception:
        out_q.put((StandbyFailed if standby is not None else WorkerFailed)(spec.name, traceback.format_exc()))
        raise
    try:
        worker.loop()
    except Exception:
        out_q.put(WorkerFailed(spec.name, traceback.format_exc()))
        raise


class Worker:
    def __init__(self, spec: WorkerSpec, core, in_q, out_q, peers: dict[str, Any], handoff: Optional[Handoff],
                 parent_pid: Optional[int] = None, sm=None):
        self.spec, self.core, self.in_q, self.out_q, self.peers = spec, core, in_q, out_q, peers
        self.sm = sm  # its green-context SM share (sm_share.GreenContextShare), if it has one
        self.handoff = handoff
        self.parent_pid = parent_pid
        self._rr = 0
        # Requests aborted while in transit between workers are dropped on arrival.
        self.aborted: OrderedDict[str, None] = OrderedDict()
        self.cuda = getattr(core.executor, "device", None) is not None and core.executor.device.type == "cuda"
        self.handlers = {AddRequest: self.on_add, AdoptRequest: self.on_adopt, AbortRequest: self.on_abort,
                         SetShare: self.on_share, OfferKV: self.on_offer, ReleaseKV: self.on_release,
                         ResetPrefixCache: self.on_reset_prefix_cache}

    def busy(self) -> bool:
        return self.core.has_work() or bool(self.handoff and self.handoff.busy)

    def loop(self) -> None:
        while True:
            if self.parent_pid is not None and os.getppid() != self.parent_pid:
                log.warning("the server (pid %d) is gone: exiting", self.parent_pid)
                return
            # Block only when idle, so a busy worker never waits on its inbox.
            try:
                msg = self.in_q.get(timeout=0.05) if not self.busy() else self.in_q.get_nowait()
            except queue.Empty:
                msg = None
            changed = False
            while msg is not None:
                if isinstance(msg, Shutdown):
                    return
                if isinstance(msg, HandOver):  # what is still queued is the successor's
                    self.retire(msg)
                    return
                changed |= bool(self.handlers[type(msg)](msg))
                try:
                    msg = self.in_q.get_nowait()
                except queue.Empty:
                    msg = None
            if self.handoff is not None:
                for req in self.handoff.poll(self.out_q.put):
                    self.core.adopt(req)
                    changed = True
            outcome = self.core.step()
            if outcome.ran or outcome.outputs or changed:
                # An idle snapshot when blocks changed hands keeps /metrics true while nothing runs.
                self.out_q.put(StepReport(self.spec.name, outcome.outputs, self.core.stats(outcome)))
            self.publish(outcome)

    # -- replaced by a standby (a new MPS share) ------------------------------------------------
    def retire(self, msg: HandOver) -> None:
        """Between iterations: hand what this worker holds to its successor, then exit."""
        if self.handoff is not None and self.handoff.busy:
            raise RuntimeError("a worker with KV transfers in flight cannot hand over")  # transfer hand-offs only
        if self.cuda:
            import torch

            torch.cuda.current_stream().synchronize()  # its KV writes are complete before the successor reads them
        state = WorkerState(self.core.scheduler.snapshot(), tuple(self.aborted))
        log.info("handing over %d running, %d parked and %d waiting requests", len(state.scheduler.running),
                 len(state.scheduler.parked), len(state.scheduler.waiting))
        self.out_q.put(Retired(self.spec.name, state, time.monotonic(), msg.sent_at))

    def take_over(self, standby) -> bool:
        """Wait for the predecessor's state and continue from it; False if told to shut down instead."""
        while True:
            if self.parent_pid is not None and os.getppid() != self.parent_pid:
                return False
            try:
                msg = standby.get(timeout=0.2)
            except queue.Empty:
                continue
            if isinstance(msg, Shutdown):
                return False
            self.core.scheduler.restore(msg.state.scheduler)
            self.aborted.update(dict.fromkeys(msg.state.aborted))
            now = time.monotonic()
            self.out_q.put(ShareSwitched(self.spec.name, self.spec.role, self.spec.share, (),
                                         now - msg.handover_at, now - msg.switch_sent_at, self.sm.sms if self.sm else 0))
            self.out_q.put(StepReport(self.spec.name, [], self.core.stats()))  # /metrics: its queues, at once
            return True

    # -- messages ------------------------------------------------------------------------------
    def on_add(self, msg: AddRequest) -> bool:
        if msg.request.request_id in self.aborted:
            return False  # new or evicted: it holds no blocks
        self.core.add_request(msg.request)
        return False

    def on_adopt(self, msg: AdoptRequest) -> bool:
        if msg.request.request_id in self.aborted:
            self.handoff.arrived_aborted(msg)
            return True
        self.core.adopt(msg.request)
        return False

    def on_offer(self, msg: OfferKV) -> bool:
        if msg.request.request_id in self.aborted:
            self.handoff.arrived_aborted(msg)
            return False
        return self.handoff.handle(msg)

    def on_release(self, msg: ReleaseKV) -> bool:
        return self.handoff.handle(msg)

    def on_abort(self, msg: AbortRequest) -> bool:
        rid = msg.request_id
        self.aborted[rid] = None
        if len(self.aborted) > 10000:
            self.aborted.popitem(last=False)
        held = self.handoff.abort(rid) if self.handoff is not None else False
        return self.core.abort(rid) or held

    def on_reset_prefix_cache(self, msg: ResetPrefixCache) -> bool:
        self.core.scheduler.pool.reset_cache()  # semi-PD's two workers both reset their one pool: idempotent
        return True

    def on_share(self, msg: SetShare) -> bool:
        t0 = time.monotonic()
        sms = 0
        if self.sm is not None:  # between iterations: the old stream drains, the next runs on the new context
            applied, sms = (), self.sm.apply(msg.share)
            graphs = getattr(self.core.executor, "graphs", None)
            if graphs is not None:  # recorded on the old context: recaptured on the new one at their next use
                graphs.invalidate()
        else:  # core sets pin; a CPU-time quota (no cores) only resizes the thread pool, the kernel enforces the rest
            applied = apply_share("cpu_affinity" if msg.cores else "none", msg.cores or (), msg.num_threads)
        t1 = time.monotonic()
        self.out_q.put(ShareSwitched(self.spec.name, self.spec.role, msg.share, applied, t1 - t0, t1 - msg.sent_at,
                                     sms))
        return False

    # -- hand-offs -----------------------------------------------------------------------------
    def publish(self, outcome) -> None:
        """Hand prefilled requests to a decode worker, evicted ones back to a prefill worker."""
        if not (outcome.handoffs or outcome.evicted):
            return
        if self.cuda:
            import torch

            torch.cuda.current_stream().synchronize()  # KV writes complete before anyone reads them
        for req in outcome.handoffs:
            self.handoff.hand_off(req, self._next(self.spec.decode_peers))
        for req in outcome.evicted:
            self.peers[self._next(self.spec.prefill_peers)].put(AddRequest(req))

    def _next(self, names: tuple[str, ...]) -> str:
        self._rr += 1
        return names[self._rr % len(names)]
