"""The disaggregated baseline (DistServe style): prefill and decode instances.

Each instance is its own process with its own copy of the weights (loaded in
that process) and its own KV pool; the memory budget `engine.kv_cache_mb` is
split by `engine.prefill_kv_fraction`. Compute is split by disjoint core sets
(on 2 cores, 1P1D gives prefill {0} and decode {1}); nP/mD is configurable.

After prefill the first token streams at once, and the request's KV blocks are
copied from the prefill pool into blocks the decode instance allocates in its
own pool (`semipd_engine.kv_transfer`); the prefill blocks are freed when the
copy is done. A full decode pool back-pressures: finished prefills wait holding
their blocks, and the prefill instance stops admitting when its pool is full.
"""

from __future__ import annotations

import dataclasses

from semipd_engine.engine_client import EngineClient
from semipd_engine.kv_cache import KVCache
from semipd_engine.model import resolve
from semipd_engine.model.loader import torch_dtype
from semipd_engine.partition import machine_cores
from semipd_engine.worker import SharedState, WorkerSpec


def instance_cores(n_prefill: int, n_decode: int, cores: tuple[int, ...]) -> list[tuple[int, ...]]:
    """Disjoint core sets, prefill instances from the front; shared round-robin if too few cores."""
    n = n_prefill + n_decode
    if len(cores) < n:
        return [(cores[i % len(cores)],) for i in range(n)]
    per = len(cores) // n
    return [tuple(cores[i * per : (i + 1) * per]) for i in range(n)]


class DisaggEngine(EngineClient):
    name = "disagg"

    def __init__(self, model_cfg, engine_cfg):
        super().__init__(model_cfg, engine_cfg)
        e = engine_cfg
        if e.num_prefill_instances < 1 or e.num_decode_instances < 1:
            raise ValueError("engine.num_prefill_instances and engine.num_decode_instances must be >= 1")
        if not 0.0 < e.prefill_kv_fraction < 1.0:
            raise ValueError("engine.prefill_kv_fraction must be in (0, 1)")
        self.names = [f"prefill{i}" for i in range(e.num_prefill_instances)] + \
                     [f"decode{i}" for i in range(e.num_decode_instances)]
        self.pools: dict[str, KVCache] = {}
        self._next_prefill = 0

    def worker_specs(self) -> list[WorkerSpec]:
        cores = instance_cores(self.engine_cfg.num_prefill_instances, self.engine_cfg.num_decode_instances,
                               machine_cores())
        return [WorkerSpec(n, "prefill_only" if n.startswith("prefill") else "decode_only", c,
                           self.engine_cfg.num_threads, handoff="transfer") for n, c in zip(self.names, cores)]

    def entry_worker(self, req) -> str:
        n = self.engine_cfg.num_prefill_instances
        self._next_prefill = (self._next_prefill + 1) % n
        return f"prefill{self._next_prefill}"

    def _share(self, name: str) -> float:
        e = self.engine_cfg
        if name.startswith("prefill"):
            return e.prefill_kv_fraction / e.num_prefill_instances
        return (1 - e.prefill_kv_fraction) / e.num_decode_instances

    def prepare(self) -> None:
        """Each instance's pool in shared memory, so decode instances can copy from prefill pools."""
        m, e = self.model_cfg, self.engine_cfg
        spec, dtype = resolve(m).spec, torch_dtype(m.dtype)
        total = e.num_kv_blocks or KVCache.blocks_for_memory(spec, e.block_size, dtype, e.kv_cache_mb)
        for name in self.names:
            blocks = max(1, int(total * self._share(name)))
            self.pools[name] = KVCache(spec, blocks, e.block_size, dtype, m.device, share=True)

    def worker_kwargs(self, spec: WorkerSpec) -> dict:
        sources = {n: kv for n, kv in self.pools.items() if n.startswith("prefill")}
        shared = SharedState(kv=self.pools[spec.name], sources=sources if spec.name.startswith("decode") else None)
        # num_kv_blocks pins the instance's pool size to the tensor it is given.
        cfg = dataclasses.replace(self.engine_cfg, num_kv_blocks=self.pools[spec.name].num_blocks)
        return {"shared": shared, "peers": dict(self._in_qs), "engine_cfg_override": cfg}
