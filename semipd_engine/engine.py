"""SemiPDEngine: disaggregated computation over unified storage.

The engine client (in the server process) is the resident owner: it loads the
weights once and allocates the one paged KV pool and its allocator in shared
memory. A prefill worker (`prefill_only`: FCFS, chunked up to the token budget)
and a decode worker (`decode_only`: continuous batching) map that same memory,
each pinned to its compute share. The prefill worker writes KV in place and
hands the request (block table, first token, sampling state) to the decode
worker, which reads the same blocks: no KV byte is copied.

The partition can be changed while serving (`POST /partition`, or
`set_partition` for the SLO-aware controller). On CPU a share is a core set and a
thread count (caps that overlap divide their cores: `partition.pinned_sets`), so each
worker applies a switch in place at its next iteration
boundary (delayed switching), independently of the other (asynchronous
switching), with no new process: the stall is two syscalls (see
docs/benchmarks.md for the measured figure).
"""

from __future__ import annotations

import logging
import time
from typing import Any, Optional

from semipd_engine.engine_client import EngineClient, PartitionControl
from semipd_engine.factory import ModelState, build_state
from semipd_engine.kv_cache import SharedBlockPool
from semipd_engine.messages import SetShare
from semipd_engine.partition import Partition, machine_cores, pinned_sets, resolve_backend, thread_counts
from semipd_engine.worker import WorkerSpec

log = logging.getLogger(__name__)


class SemiPDEngine(EngineClient):
    name = "semipd"

    def __init__(self, model_cfg, engine_cfg):
        super().__init__(model_cfg, engine_cfg)
        self.backend = resolve_backend(engine_cfg.partition_backend, model_cfg.device)
        self.cores = machine_cores()
        self.partition = Partition(engine_cfg.prefill_share, engine_cfg.decode_share)
        if self.backend == "none":  # no way to cap a phase: say what actually runs
            self.partition = Partition(100, 100)
        self.shared: Optional[ModelState] = None

    @property
    def partition_control(self) -> Optional[PartitionControl]:
        return self

    # -- composition ---------------------------------------------------------------
    def _cores(self, p: Partition) -> tuple[Any, Any]:
        """Where each phase runs: its cap's cores, divided with the other phase's where the caps overlap."""
        if self.backend != "cpu_affinity":
            return None, None
        return pinned_sets(p, self.cores)

    def _threads(self, p: Partition) -> tuple[int, int]:
        """Thread pools per phase: `engine.num_threads` if set, else one per core it runs on (`thread_counts`)."""
        if self.engine_cfg.num_threads or self.backend != "cpu_affinity":
            return self.engine_cfg.num_threads, self.engine_cfg.num_threads
        return thread_counts(p, self.cores)

    def worker_specs(self) -> list[WorkerSpec]:
        p_cores, d_cores = self._cores(self.partition)
        p_threads, d_threads = self._threads(self.partition)
        return [WorkerSpec("prefill", "prefill_only", "prefill", p_cores, p_threads, pool="shared",
                           handoff="adopt", decode_peers=("decode",)),
                WorkerSpec("decode", "decode_only", "decode", d_cores, d_threads, pool="shared",
                           handoff="adopt", prefill_peers=("prefill",))]

    def entry_worker(self, req) -> str:
        return "prefill"

    def prepare(self) -> None:
        """The resident owner: one copy of the weights, one KV pool, one allocator, in shared memory."""
        self.shared = build_state(self.model_cfg, self.engine_cfg, share=True, lock=self._ctx.Lock())
        log.info("semi-PD owner: %d parameters, KV pool of %d blocks (%.1f MiB) shared by both workers",
                 sum(p.numel() for p in self.shared.model.parameters()), self.shared.kv.num_blocks,
                 self.shared.kv.nbytes / 2**20)

    def reset_shared(self) -> None:
        """After a worker died: a fresh allocator (and lock) over the same weights and KV tensor.

        Every request was failed and every worker killed, so no block is legitimately held; the
        old allocator may have lost blocks with the dead worker's requests (or requests in transit
        between the two), and its lock may be held by a process that no longer exists.
        """
        old = self.shared.pool
        self.shared.pool = SharedBlockPool(old.num_blocks, old.block_size, self.engine_cfg.watermark,
                                           self._ctx.Lock())
        if old.num_used:
            log.warning("semi-PD owner: %d KV blocks were held by requests of the replaced workers; "
                        "the new allocator starts with all %d free", old.num_used, old.num_blocks)

    def worker_kwargs(self, spec: WorkerSpec) -> dict:
        return {"state": self.shared, "peers": dict(self._in_qs)}

    # -- resource controller ---------------------------------------------------------
    def set_partition(self, p: Partition) -> dict[str, Any]:
        """Switch the shares; each worker applies its own at its next iteration boundary."""
        if self.backend != "cpu_affinity":
            raise ValueError(f"partition backend {self.backend!r} cannot change shares at run time")
        old = self.partition
        new_fit = list(zip(self._cores(p), self._threads(p)))
        old_fit = list(zip(self._cores(old), self._threads(old)))
        now = time.monotonic()
        # A phase whose share is unchanged may still run on other cores (the overlap changed).
        for i, (name, share, old_share) in enumerate([("prefill", p.prefill_share, old.prefill_share),
                                                      ("decode", p.decode_share, old.decode_share)]):
            if share != old_share or new_fit[i] != old_fit[i]:
                cores, threads = new_fit[i]
                self._send(name, SetShare(cores, share, now, threads))
        self.partition = p  # replacement workers start with it too
        return self.describe()

    def describe(self) -> dict[str, Any]:
        p_cores, d_cores = self._cores(self.partition)
        p_threads, d_threads = self._threads(self.partition)
        return {"prefill_share": self.partition.prefill_share, "decode_share": self.partition.decode_share,
                "prefill_cores": p_cores, "decode_cores": d_cores, "prefill_threads": p_threads,
                "decode_threads": d_threads, "backend": self.backend}
