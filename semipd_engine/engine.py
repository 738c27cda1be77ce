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
thread count, so each worker applies a switch in place at its next iteration
boundary (delayed switching), independently of the other (asynchronous
switching), with no new process: the stall is two syscalls (see
docs/benchmarks.md for the measured figure).
"""

from __future__ import annotations

import logging
import time
from typing import Any

from aiohttp import web

from semipd_engine.engine_client import EngineClient
from semipd_engine.kv_cache import BlockPool, KVCache
from semipd_engine.model import load_weights, resolve
from semipd_engine.model.loader import build_model, torch_dtype
from semipd_engine.partition import Partition, core_sets, machine_cores, resolve_backend
from semipd_engine.protocol import ApiError
from semipd_engine.worker import SharedState, WorkerSpec

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
        self.shared: SharedState | None = None

    # -- composition ---------------------------------------------------------------
    def _cores(self, p: Partition) -> tuple[Any, Any]:
        if self.backend != "cpu_affinity":
            return None, None
        return core_sets(p, self.cores)

    def worker_specs(self) -> list[WorkerSpec]:
        p_cores, d_cores = self._cores(self.partition)
        return [WorkerSpec("prefill", "prefill_only", p_cores, self.engine_cfg.num_threads, pool="shared"),
                WorkerSpec("decode", "decode_only", d_cores, self.engine_cfg.num_threads, pool="shared")]

    def entry_worker(self, req) -> str:
        return "prefill"

    def prepare(self) -> None:
        """The resident owner: one copy of the weights, one KV pool, one allocator."""
        m, e = self.model_cfg, self.engine_cfg
        spec = resolve(m).spec
        dtype = torch_dtype(m.dtype)
        model = build_model(spec, load_weights(m, spec), dtype, m.attention_backend, m.device)
        model.share_memory()
        blocks = e.num_kv_blocks or KVCache.blocks_for_memory(spec, e.block_size, dtype, e.kv_cache_mb)
        kv = KVCache(spec, blocks, e.block_size, dtype, m.device, share=True)
        pool = BlockPool(blocks, e.block_size, e.watermark).share(self._ctx.Lock())
        self.shared = SharedState(model, kv, pool)
        log.info("semi-PD owner: %d parameters, KV pool of %d blocks (%.1f MiB) shared by both workers",
                 sum(p.numel() for p in model.parameters()), blocks, kv.nbytes / 2**20)

    def worker_kwargs(self, spec: WorkerSpec) -> dict:
        return {"shared": self.shared, "peers": dict(self._in_qs)}

    # -- resource controller ---------------------------------------------------------
    def set_partition(self, p: Partition) -> dict[str, Any]:
        """Switch the shares; each worker applies its own at its next iteration boundary."""
        if self.backend != "cpu_affinity":
            raise ValueError(f"partition backend {self.backend!r} cannot change shares at run time")
        p_cores, d_cores = self._cores(p)
        now = time.monotonic()
        if p.prefill_share != self.partition.prefill_share:
            self._in_qs["prefill"].put(("partition", p_cores, p.prefill_share, now))
        if p.decode_share != self.partition.decode_share:
            self._in_qs["decode"].put(("partition", d_cores, p.decode_share, now))
        self.partition = p
        return self.describe()

    def describe(self) -> dict[str, Any]:
        p_cores, d_cores = self._cores(self.partition)
        return {"prefill_share": self.partition.prefill_share, "decode_share": self.partition.decode_share,
                "prefill_cores": p_cores, "decode_cores": d_cores, "backend": self.backend}

    def extra_routes(self):
        async def get_partition(request: web.Request) -> web.Response:
            return web.json_response(self.describe())

        async def post_partition(request: web.Request) -> web.Response:
            try:
                try:
                    body = await request.json()
                except ValueError:
                    raise ApiError("request body is not valid JSON") from None
                if not isinstance(body, dict):
                    raise ApiError("request body must be a JSON object")
                try:
                    p = Partition(body.get("prefill_share", self.partition.prefill_share),
                                  body.get("decode_share", self.partition.decode_share))
                    return web.json_response(self.set_partition(p))
                except ValueError as e:
                    param = "decode_share" if "decode_share" in str(e) else "prefill_share"
                    raise ApiError(str(e), param) from None
            except ApiError as e:
                return web.json_response(e.body(), status=e.status)

        return [("GET", "/partition", get_partition), ("POST", "/partition", post_partition)]
