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

from semipd_engine.engine_client import EngineClient
from semipd_engine.factory import ModelState, build_state, num_kv_blocks
from semipd_engine.model import resolve
from semipd_engine.partition import machine_cores
from semipd_engine.worker import WorkerSpec


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
        self.prefills = tuple(f"prefill{i}" for i in range(e.num_prefill_instances))
        self.decodes = tuple(f"decode{i}" for i in range(e.num_decode_instances))
        self.pools: dict[str, ModelState] = {}
        self._next_prefill = 0

    def worker_specs(self) -> list[WorkerSpec]:
        e = self.engine_cfg
        cores = iter(instance_cores(len(self.prefills), len(self.decodes), machine_cores()))
        return ([WorkerSpec(n, "prefill_only", "prefill", next(cores), e.num_threads, handoff="transfer",
                            decode_peers=self.decodes) for n in self.prefills]
                + [WorkerSpec(n, "decode_only", "decode", next(cores), e.num_threads, handoff="transfer",
                              prefill_peers=self.prefills) for n in self.decodes])

    def entry_worker(self, req) -> str:
        self._next_prefill = (self._next_prefill + 1) % len(self.prefills)
        return self.prefills[self._next_prefill]

    def _fraction(self, name: str) -> float:
        e = self.engine_cfg
        if name in self.prefills:
            return e.prefill_kv_fraction / len(self.prefills)
        return (1 - e.prefill_kv_fraction) / len(self.decodes)

    def prepare(self) -> None:
        """Each instance's KV pool in shared memory, so decode instances can copy from prefill pools.

        Weights are not built here: every instance loads its own copy in its process, as DistServe does.
        """
        spec = resolve(self.model_cfg).spec
        for name in self.prefills + self.decodes:
            blocks = num_kv_blocks(spec, self.model_cfg, self.engine_cfg, self._fraction(name))
            # The allocator travels to the instance's process as a copy: the instance is its only owner.
            self.pools[name] = build_state(self.model_cfg, self.engine_cfg, weights=False, kv_blocks=blocks,
                                           share=True)

    def worker_kwargs(self, spec: WorkerSpec) -> dict:
        sources = {n: self.pools[n].kv for n in self.prefills} if spec.role == "decode" else None
        return {"state": self.pools[spec.name], "peers": dict(self._in_qs), "sources": sources}
