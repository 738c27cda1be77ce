"""The process driver: an engine's topology run as worker processes behind the server.

It takes a `Topology` (semipd_engine.topology.graph) and runs it: one process per
worker, pinned to its unit's cores (or its share of them), the pools the
topology says are shared built here in shared memory (one copy of the weights
where the topology shares them), requests routed to the entry workers round
robin, outputs fanned in per request in token order, aborts, crash detection
and recovery, shutdown. Nothing here names an engine. What the server may
expose beyond generation is a typed capability read off the topology:
`partition_control` (a partitioned pair: semi-PD's shares) and `controller`
(the SLO-aware loop), None where the topology has none.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import queue
import threading
import time
from collections import deque
from collections.abc import Callable
from typing import Any, Optional, Protocol

import torch.multiprocessing as tmp

from semipd_engine.control.loop import ControlLoop
from semipd_engine.core.messages import (
    AbortRequest,
    AddRequest,
    HandOver,
    KVTransferred,
    ResetPrefixCache,
    Retired,
    SetShare,
    ShareSwitched,
    Shutdown,
    StandbyFailed,
    StandbyReady,
    StepReport,
    TakeOver,
    WorkerFailed,
    WorkerReady,
    WorkersRestarted,
)
from semipd_engine.core.request import Request, RequestOutput
from semipd_engine.process.worker import WorkerSpec, worker_main
from semipd_engine.shares.partition import (
    GPU_BACKENDS,
    Partition,
    machine_cores,
    pinned_sets,
    resolve_backend,
    thread_counts,
    unit_cores,
)
from semipd_engine.topology.engines import build_topology
from semipd_engine.topology.graph import Topology

log = logging.getLogger(__name__)


class EngineDead(RuntimeError):
    pass


class EngineObserver(Protocol):
    """What watches an engine (the server's metrics): every worker iteration's stats, and its events (share
    switches, KV transfers, worker restarts, the controller's decisions)."""

    def observe_iteration(self, worker: str, stats) -> None: ...

    def observe_event(self, event) -> None: ...


class PartitionControl(Protocol):
    """Run-time control of semi-PD's compute shares."""

    @property
    def partition(self) -> Partition: ...

    def describe(self) -> dict: ...

    def set_partition(self, p: Partition) -> dict: ...


class ShareControl:
    """The shares of a topology's partitioned pair (semi-PD's prefill and decode workers on one unit).

    On a GPU a share is a green context of the share's SMs in each worker (`green_context`: switched in-process
    at the worker's next iteration), or an MPS client's thread percentage, fixed when the worker starts (`mps`:
    a switch starts a standby with the new percentage over the same weights and pool, and it takes over at the
    old worker's next iteration boundary; `EngineClient._start_standby`).
    On CPU a share is either CPU time (`cpu_quota`: a cgroup per worker whose CFS quota is the share of the
    unit's cores, and a thread count to match) or a core set and a thread count (`cpu_affinity`: caps that
    overlap divide their cores, `partition.pinned_sets`). Either way a switch needs no new process: the
    quota is written here and takes effect at once; threads and pinning change in each worker at its next
    iteration boundary (delayed switching), independently of the other (asynchronous switching).
    """

    def __init__(self, prefill: str, decode: str, partition: Partition, backend: str, cores: tuple[int, ...],
                 num_threads: int, send: Callable[[str, Any], None], sm_device: Optional[Callable[[], Any]] = None,
                 restart: Optional[Callable[[str, float], None]] = None):
        self.workers, self.backend, self.cores = (prefill, decode), backend, cores
        self.num_threads, self._send = num_threads, send
        self._restart = restart  # mps: (worker, asked at) -> a standby with the new share replaces the worker
        # No way to cap a phase: say what actually runs.
        self.partition = partition if backend != "none" else Partition(100, 100)
        self.quota, self.groups = None, {}
        self.sm_device: Optional[tuple[int, int]] = None  # (SMs, compute capability major) under green contexts
        if backend == "green_context":
            from semipd_engine.shares.sm_share import TorchGreenContexts

            self.sm_device = (sm_device or TorchGreenContexts)().device()
        if backend == "cpu_quota":
            from semipd_engine.shares.cpu_quota import CpuQuota

            self.quota, why = CpuQuota.open()
            if self.quota is None:
                raise ValueError(f"engine.partition_backend=cpu_quota cannot run here: {why}")

    def _cores(self, p: Partition) -> tuple[Any, Any]:
        if self.backend != "cpu_affinity":
            return None, None
        return pinned_sets(p, self.cores)

    def _threads(self, p: Partition) -> tuple[int, int]:
        """`engine.num_threads` if set, else the cores each phase can keep busy: its cores (`thread_counts`), or
        the cores' worth of time its quota allows."""
        if self.backend in GPU_BACKENDS:
            return 0, 0
        if self.num_threads:
            return self.num_threads, self.num_threads
        if self.backend == "cpu_affinity":
            return thread_counts(p, self.cores)
        if self.backend == "cpu_quota":
            from semipd_engine.shares.cpu_quota import threads_for

            return threads_for(p.prefill_share, len(self.cores)), threads_for(p.decode_share, len(self.cores))
        return 0, 0

    def _quotas(self, p: Partition) -> tuple[float, float]:
        n = len(self.cores)
        return p.prefill_share / 100 * n, p.decode_share / 100 * n

    def worker_env(self, worker: str) -> dict[str, str]:
        """Environment a worker of the pair must start with (read by the OpenMP runtime when torch loads).

        Under a CPU-time quota the pair's threads share the cores, and spinning OpenMP threads burn the quota
        at every barrier while a sibling waits for a core: measured on 2 cores (llama-100m, 70/30), prefill
        iterations took 5.5 s spinning against 0.26 s with passive waiting. A user's own setting wins."""
        if self.backend == "mps" and worker in self.workers:  # an MPS client's share is fixed when it starts
            from semipd_engine.shares.sm_share import mps_env

            return mps_env(self.share_of(worker))
        if self.backend != "cpu_quota" or worker not in self.workers or "OMP_WAIT_POLICY" in os.environ:
            return {}
        return {"OMP_WAIT_POLICY": "PASSIVE"}

    def share_of(self, worker: str) -> int:
        """The current share (%) of a worker of the pair."""
        return (self.partition.prefill_share, self.partition.decode_share)[self.workers.index(worker)]

    def attach(self, worker: str, pid: int) -> None:
        """A (new) process of the pair: into its group, under the current quota."""
        if self.quota is None:
            return
        if worker not in self.groups:
            self.groups[worker] = self.quota.create(worker)
        self.quota.set(self.groups[worker], self._quotas(self.partition)[self.workers.index(worker)])
        self.quota.attach(self.groups[worker], pid)

    def close(self) -> None:
        if self.quota is not None and self.groups:
            self.quota.remove()
            self.groups = {}

    def placement(self, worker: str) -> tuple[Any, int]:
        """(cores, threads) a worker of the pair starts with under the current partition."""
        i = self.workers.index(worker)
        return self._cores(self.partition)[i], self._threads(self.partition)[i]

    def set_partition(self, p: Partition) -> dict[str, Any]:
        """Switch the shares; each worker applies its own at its next iteration boundary."""
        if self.backend == "mps" and self._restart is None:
            raise ValueError("partition backend 'mps' fixes a worker's share when the worker starts, and this "
                             "engine cannot replace its workers")
        if self.backend not in ("cpu_affinity", "cpu_quota", "green_context", "mps"):
            raise ValueError(f"partition backend {self.backend!r} cannot change shares at run time")
        old = self.partition
        new_fit = list(zip(self._cores(p), self._threads(p)))
        old_fit = list(zip(self._cores(old), self._threads(old)))
        if self.quota is not None:  # the kernel applies a quota at once: no worker needs to act on it
            for name, cores in zip(self.workers, self._quotas(p)):
                if name in self.groups:
                    self.quota.set(self.groups[name], cores)
        now = time.monotonic()
        # A phase whose share is unchanged may still run on other cores (the overlap changed).
        changed = [i for i, (share, old_share) in enumerate([(p.prefill_share, old.prefill_share),
                                                             (p.decode_share, old.decode_share)])
                   if share != old_share or new_fit[i] != old_fit[i]]
        self.partition = p  # replacement workers (and MPS standbys) start with it
        for i in changed:
            if self.backend == "mps":  # a new process: MPS reads the percentage when a client's context is created
                self._restart(self.workers[i], now)
            else:
                cores, threads = new_fit[i]
                self._send(self.workers[i], SetShare(cores, self.share_of(self.workers[i]), now, threads))
        return self.describe()

    def running(self, worker: str, share: int) -> None:
        """Record that `worker` runs at `share` after all (its MPS standby could not start)."""
        p = self.partition
        self.partition = (Partition(share, p.decode_share) if self.workers.index(worker) == 0
                          else Partition(p.prefill_share, share))

    def describe(self) -> dict[str, Any]:
        p_cores, d_cores = self._cores(self.partition)
        p_threads, d_threads = self._threads(self.partition)
        out = {"prefill_share": self.partition.prefill_share, "decode_share": self.partition.decode_share,
               "prefill_cores": p_cores, "decode_cores": d_cores, "prefill_threads": p_threads,
               "decode_threads": d_threads, "backend": self.backend}
        if self.quota is not None:  # CPUs' worth of time per period
            out["prefill_quota_cpus"], out["decode_quota_cpus"] = self._quotas(self.partition)
        if self.sm_device is not None:  # what each green context holds, as the workers round it
            from semipd_engine.shares.sm_share import sm_count, sm_granularity

            total, major = self.sm_device
            out["prefill_sms"], out["decode_sms"] = (sm_count(s, total, sm_granularity(major)) or total
                                                     for s in map(self.share_of, self.workers))
            out["device_sms"] = total
        return out


class EngineClient:
    """The server's side of an engine.

    States: created -> starting -> ready <-> restarting, -> dead (start-up failed, or no restarts
    left), -> stopping. When a worker dies (an exception it could not contain, a kill -9) every
    in-flight request is failed at once and the engine replaces *all* its workers, with fresh
    queues: a process killed mid-write can leave a torn message in a queue, or hold a queue's
    or the shared allocator's lock forever, so nothing the dead worker touched is reused. What
    the engine owns in this process (shared weights and KV pools) survives; shared allocators
    are made whole by `reset_shared` (no request holds a block once all were failed).
    """

    RESTART_WINDOW_S = 60.0

    def __init__(self, model_cfg, engine_cfg, topology: Optional[Topology] = None,
                 executor_wrapper: Optional[Callable[[Any], Any]] = None):
        self.model_cfg, self.engine_cfg = model_cfg, engine_cfg
        # Picklable; each worker wraps its executor with it (a tracer, or a test's pacing to fixed iteration times).
        self.executor_wrapper = executor_wrapper
        self.topology = topology if topology is not None else build_topology(engine_cfg)
        self.name = engine_cfg.name
        # torch's spawn context: tensors (shared weights, the KV pool) travel as shared memory.
        self._ctx = tmp.get_context("spawn")
        self._out_q = None
        self._in_qs: dict[str, object] = {}
        self._procs: dict[str, object] = {}
        self._gen = 0  # worker generation: messages and threads of replaced workers are ignored
        self.state = "created"
        self.worker_info: dict[str, dict] = {}
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
        self._observers: list[EngineObserver] = []
        self.roles = {w.name: w.role for w in self.topology.workers}
        self._entry_rr = 0
        self.states: dict[str, Any] = {}  # pool name -> ModelState built here (shared with the workers)
        topo, cores = self.topology, machine_cores()
        self.unit_cores = unit_cores(topo.num_units, cores)
        self.shares: Optional[ShareControl] = None
        pair = topo.partitioned()
        if pair is not None:
            pre, dec = pair
            backend = resolve_backend(engine_cfg.partition_backend, model_cfg.device)
            self.shares = ShareControl(pre.name, dec.name, Partition(pre.share, dec.share), backend,
                                       self.unit_cores[pre.unit], engine_cfg.num_threads, self._send,
                                       restart=self._start_standby)
        # MPS share switches (`_start_standby`): the standby process of a worker, its queue and the share it starts
        # with; the process it replaces until that one has exited.
        self._standbys: dict[str, tuple[Any, Any, int, float]] = {}  # (process, queue, share, asked at)
        self._retiring: dict[str, Any] = {}
        self.control: Optional[ControlLoop] = None
        if topo.controller == "slo":
            self.control = ControlLoop(engine_cfg, self.unit_cores[pair[0].unit]
                                       if self.shares.backend == "cpu_affinity" else None,
                                       log_path=engine_cfg.decision_log)
        self._control_task: Optional[asyncio.Task] = None
        self._t_start = time.monotonic()

    def subscribe(self, observer: EngineObserver) -> None:
        """`observer` is told every worker iteration and every engine event from now on."""
        self._observers.append(observer)

    def _notify(self, event) -> None:
        for o in self._observers:
            o.observe_event(event)

    # -- capabilities the server may expose (typed; None where the engine has none) --------
    @property
    def partition_control(self) -> Optional[PartitionControl]:
        return self.shares

    @property
    def controller(self) -> Optional[object]:
        """The SLO-aware partitioner, for engines steered by one."""
        return self.control.partitioner if self.control is not None else None

    # -- the topology, as processes ------------------------------------------------------
    def worker_specs(self) -> list[WorkerSpec]:
        specs = []
        single = self.topology.num_units == 1
        for w in self.topology.workers:
            if self.shares is not None and w.name in self.shares.workers:
                cores, threads = self.shares.placement(w.name)
            else:  # its unit to itself: alone on the machine, every core the process may use
                cores, threads = (None if single else self.unit_cores[w.unit]), self.engine_cfg.num_threads
            paired = self.shares is not None and w.name in self.shares.workers
            specs.append(WorkerSpec(w.name, w.policy, w.role, cores, threads, pool=w.pool, handoff=w.handoff,
                                    decode_peers=w.decode_peers, prefill_peers=w.prefill_peers,
                                    sm_backend=self.shares.backend if paired else "none",
                                    share=self.shares.share_of(w.name) if paired else 100))
        return specs

    def entry_worker(self, req: Request) -> str:
        entry = self.topology.entry
        name = entry[self._entry_rr % len(entry)]
        self._entry_rr += 1
        return name

    def prepare(self) -> None:
        """The pools other processes share or copy from, in shared memory, and the one weight copy where the
        topology shares it (runs in a thread before the workers are spawned). A pool with one user that nobody
        copies from is built by its worker in its own process, weights and all."""
        from semipd_engine.model import resolve
        from semipd_engine.runtime.factory import build_state, num_kv_blocks

        topo = self.topology
        spec = resolve(self.model_cfg).spec
        weights = None
        for pool in topo.pools:
            users = topo.users(pool.name)
            shared = len(users) > 1
            if not (shared or topo.shared_weights or any(w.handoff == "transfer" for w in users)):
                if pool.kv_fraction == 1.0:
                    continue
            blocks = num_kv_blocks(spec, self.model_cfg, self.engine_cfg, pool.kv_fraction)
            # A pool with one user travels to it as a copy of its allocator: that worker is its only owner.
            state = build_state(self.model_cfg, self.engine_cfg, weights=topo.shared_weights and weights is None,
                                kv_blocks=blocks, share=True, lock=self._ctx.Lock() if shared else None)
            if topo.shared_weights:
                weights = state.model = weights if weights is not None else state.model
            self.states[pool.name] = state
            log.info("engine %s: pool %s of %d blocks (%.1f MiB) for %s%s", self.name, pool.name, state.kv.num_blocks,
                     state.kv.nbytes / 2**20, ", ".join(w.name for w in users),
                     "; one weight copy shared by every worker" if topo.shared_weights else "")

    def reset_shared(self) -> None:
        """After a worker died: fresh allocators (and locks) over the same KV tensors of the shared pools.

        Every request was failed and every worker killed, so no block is legitimately held; an old
        allocator may have lost blocks with a dead worker's requests (or requests in transit between
        workers), and its lock may be held by a process that no longer exists.
        """
        from semipd_engine.runtime.kv_cache import SharedBlockPool

        for name, state in self.states.items():
            old = state.pool
            if not isinstance(old, SharedBlockPool):
                continue  # a worker's own allocator: its replacement gets a fresh copy
            state.pool = SharedBlockPool(old.num_blocks, old.block_size, self.engine_cfg.watermark, self._ctx.Lock(),
                                         old.prefix_caching)
            if old.num_used:
                log.warning("engine %s: %d KV blocks of pool %s were held by requests of the replaced workers; "
                            "the new allocator starts with all %d free", self.name, old.num_used, name,
                            old.num_blocks)

    def worker_kwargs(self, spec: WorkerSpec) -> dict:
        topo = self.topology
        sources = None
        if spec.handoff == "transfer" and spec.role == "decode":  # it copies out of its prefill peers' pools
            sources = {p: self.states[topo.worker(p).pool].kv for p in spec.prefill_peers}
        return {"state": self.states.get(spec.pool), "peers": dict(self._in_qs), "sources": sources,
                "executor_wrapper": self.executor_wrapper}

    def observe_request(self, arrival: float, first_token: Optional[float], finished: float,
                        output_tokens: int) -> None:
        """A request finished (server-side times)."""
        if self.control is not None:
            self.control.finished(arrival, first_token, finished, output_tokens)

    def observe_iteration(self, worker: str, stats, num_outputs: int) -> None:
        """A worker iteration finished; a prefill worker's outputs are requests done prefilling."""
        if self.control is not None and self.roles.get(worker) == "prefill" and stats.num_prefill_tokens:
            self.control.prefill_iteration(stats.duration_s, num_outputs)

    def pool_label(self, worker: str) -> str:
        """The metrics label of the KV pool a worker uses (semi-PD's workers share one)."""
        return self.topology.worker(worker).pool if worker in self.roles else worker

    # -- the control loop (topologies with a controller) -----------------------------------
    def _start_control(self) -> None:
        self._t_start = time.monotonic()
        self.control.reset(self._t_start)
        p = self.shares.partition
        self.control.record({"time_s": 0.0, "prefill_share": p.prefill_share, "decode_share": p.decode_share,
                             "reason": "start"})
        self._control_task = asyncio.create_task(self._control_loop())

    async def _control_loop(self) -> None:
        while self.state not in ("stopping", "dead"):
            await asyncio.sleep(self.control.window_s)
            if self.ready:  # a window that spans a worker restart is still one window
                self.control_step()

    def control_step(self) -> dict:
        now = time.monotonic()
        d = self.control.step(now, now - self._t_start, self.shares.partition)
        if d.new != self.shares.partition:
            self.shares.set_partition(d.new)
        self._notify(d)
        return d.row()

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
        if self.control is not None:
            self._start_control()

    async def _spawn(self, timeout_s: float) -> None:
        """Start one generation of workers with fresh queues; returns once every one is ready."""
        specs = self.worker_specs()
        self._gen += 1
        gen = self._gen
        self._out_q = out_q = self._ctx.Queue()
        self._in_qs = {spec.name: self._ctx.Queue() for spec in specs}
        self._procs = {}
        for spec in specs:
            self._procs[spec.name] = self._start_process(spec, out_q)
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

    def _start_process(self, spec: WorkerSpec, out_q, standby=None):
        # Spawned from the event-loop thread: the workers' parent-death signal is tied to it.
        p = self._ctx.Process(target=worker_main, name=f"worker-{spec.name}", daemon=True,
                              args=(spec, self.model_cfg, self.engine_cfg, self._in_qs[spec.name], out_q),
                              kwargs={**self.worker_kwargs(spec), "parent_pid": os.getpid(), "standby": standby})
        with _environ(self.shares.worker_env(spec.name) if self.shares is not None else {}):
            p.start()
        if self.shares is not None and spec.name in self.shares.workers:
            self.shares.attach(spec.name, p.pid)
        return p

    # -- MPS share switches: a standby takes over ------------------------------------------------
    def _start_standby(self, worker: str, sent_at: float) -> None:
        """Start `worker`'s successor with its new share (MPS fixes a client's percentage when it starts). It maps
        the same weights and KV pool, says `StandbyReady`; the old worker is then told to hand over at its next
        iteration boundary (`HandOver`), and the successor goes on from its state (`TakeOver`): nothing is failed,
        lost or recomputed. Prefill and decode switch independently; a share asked for while a standby is still
        starting is applied by another standby once this one has taken over."""
        if self.state != "ready" or worker in self._standbys:
            return  # a restart starts every worker at the current partition; a standby in flight re-checks
        spec = next(s for s in self.worker_specs() if s.name == worker)
        q = self._ctx.Queue()
        proc = self._start_process(spec, self._out_q, standby=q)
        self._standbys[worker] = (proc, q, spec.share, sent_at)
        log.info("engine %s: standby for %s started (pid %d) with share %d", self.name, worker, proc.pid, spec.share)

    def _standby_ready(self, msg: StandbyReady) -> None:
        proc, q, share, sent_at = self._standbys[msg.worker]
        self._retiring[msg.worker] = self._procs[msg.worker]
        self._procs[msg.worker] = proc  # crash detection watches the successor from now on (and the old one)
        self.worker_info[msg.worker] = msg.info
        self._send(msg.worker, HandOver(sent_at))

    def _retired(self, msg: Retired) -> None:
        proc, q, share, sent_at = self._standbys.pop(msg.worker)
        self._put(q, TakeOver(msg.state, msg.handover_at, msg.sent_at))
        old = self._retiring.get(msg.worker)
        if old is not None:
            self._loop.create_task(self._reap(old, msg.worker))
        if self.shares.share_of(msg.worker) != share:  # asked for again while this standby started
            self._start_standby(msg.worker, time.monotonic())

    async def _reap(self, proc, retiring: Optional[str] = None) -> None:
        """Join an exiting process (a retired worker, named by `retiring`, or a failed standby)."""
        await asyncio.to_thread(proc.join, 10.0)
        if proc.is_alive():
            proc.kill()
        if retiring is not None and self._retiring.get(retiring) is proc:
            del self._retiring[retiring]

    def _standby_failed(self, msg: StandbyFailed) -> None:
        proc, q, share, sent_at = self._standbys.pop(msg.worker)
        old_share = self.worker_info.get(msg.worker, {}).get("share", 100)
        log.error("engine %s: the standby for %s (share %d) failed to start; it keeps share %d:\n%s", self.name,
                  msg.worker, share, old_share, msg.traceback)
        self.shares.running(msg.worker, old_share)
        self._loop.create_task(self._reap(proc))

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
        for task in (self._restart_task, self._control_task):
            if task is not None:
                task.cancel()
        for q in self._in_qs.values():
            self._put(q, Shutdown())
        for _, q, *_ in self._standbys.values():
            self._put(q, Shutdown())
        deadline = time.monotonic() + timeout_s
        for p in [*self._procs.values(), *self._retiring.values(), *(p for p, *_ in self._standbys.values())]:
            await asyncio.to_thread(p.join, max(0.1, deadline - time.monotonic()))
            if p.is_alive():
                p.kill()
                p.join(1)
        self._fail_all("server shutting down", reason="abort")
        if self.shares is not None:
            self.shares.close()

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
        self._notify(WorkersRestarted(reason, seconds, self.restarts, dict(self.worker_info)))

    async def _stop_workers(self) -> None:
        """Kill every worker of the current generation (standbys and retiring ones too); their queues are
        abandoned."""
        procs, in_qs = [*self._procs.values(), *self._retiring.values()], self._in_qs
        procs += [proc for proc, *_ in self._standbys.values()]
        self._in_qs, self._standbys, self._retiring = {}, {}, {}
        for p in procs:
            if p.is_alive():
                p.kill()
        for p in procs:
            await asyncio.to_thread(p.join, 5.0)
        for q in in_qs.values():
            q.cancel_join_thread()  # a feeder blocked on a dead reader must not hold up exit
            q.close()

    @staticmethod
    def _dead_worker(procs: dict, retiring: Optional[dict] = None) -> Optional[str]:
        for name, p in procs.items():
            if not p.is_alive():
                return f"worker {name} (pid {p.pid}) exited with code {p.exitcode}"
        for name, p in (retiring or {}).items():  # handing over: only a crash is a failure, not its exit
            if not p.is_alive() and p.exitcode != 0:
                return f"worker {name} (pid {p.pid}, handing over) exited with code {p.exitcode}"
        return None

    def _monitor_loop(self) -> None:
        """Notice a dead worker within milliseconds (process sentinels), whatever killed it."""
        from multiprocessing.connection import wait

        while self.state not in ("stopping", "dead"):
            gen, procs = self._gen, dict(self._procs)
            retiring = {n: p for n, p in dict(self._retiring).items() if p.exitcode != 0}
            if self.state != "ready" or not procs:
                time.sleep(0.05)
                continue
            sentinels = [p.sentinel for p in procs.values()] + [p.sentinel for p in retiring.values()]
            if not wait(sentinels, timeout=0.2) or gen != self._gen:
                continue
            reason = self._dead_worker(procs, retiring)
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
        if self.control is not None:
            self.control.arrival()
        return stream

    def abort(self, request_id: str) -> None:
        if self._streams.pop(request_id, None) is None:
            return
        self._next.pop(request_id, None)
        self._held.pop(request_id, None)
        for q in self._in_qs.values():  # the request may have moved between workers
            self._put(q, AbortRequest(request_id))

    def reset_prefix_cache(self) -> None:
        """Every worker forgets its cached prefixes (vLLM's /reset_prefix_cache); running requests keep theirs."""
        for q in self._in_qs.values():
            self._put(q, ResetPrefixCache())

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
                for o in self._observers:
                    o.observe_iteration(msg.worker, msg.stats)
            for out in msg.outputs:
                self._deliver(out)
        elif isinstance(msg, (ShareSwitched, KVTransferred)):
            self._notify(msg)
        elif isinstance(msg, StandbyReady) and msg.worker in self._standbys:
            self._standby_ready(msg)
        elif isinstance(msg, Retired) and msg.worker in self._standbys:
            self._retired(msg)
        elif isinstance(msg, StandbyFailed) and msg.worker in self._standbys:
            self._standby_failed(msg)
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


@contextlib.contextmanager
def _environ(env: dict[str, str]):
    """`env` in os.environ while a worker is spawned (a spawned child starts from the parent's environment)."""
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def make_engine(model_cfg, engine_cfg) -> EngineClient:
    """The engine `engine_cfg.name`, composed from its topology, as worker processes."""
    return EngineClient(model_cfg, engine_cfg, build_topology(engine_cfg))
