"""An engine as data: its workers, the KV pools they use, how a prefilled request moves between them.

Both drivers take a `Topology` and nothing else engine-specific. The process driver
(`engine_client.EngineClient`) starts one worker process per `WorkerNode`; the event
driver (`sim.build` + `sim.simulator`) one `SimWorker` on a virtual clock. Both give
a worker the same scheduler policy over the same kind of pool, the same hand-off
object (`handoff.HANDOFFS`) and, where the topology has one, the same controller.

Devices are *units*: the process driver gives each unit a disjoint set of this
machine's cores, the simulator a core count (CPU profile) or a GPU / TP group
(roofline). Workers on one unit with a `share` divide it as a partition (semi-PD);
a worker without one has its unit to itself.

An engine is one function from its config to its topology, registered in `TOPOLOGIES`
under the engine's name with the config keys it reads. The built-in engines and the
lookups (`build_topology`, `check_engine_config`: a key set for an engine that does
not read it is an error naming both) are in semipd_engine/topology/engines.py.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Optional

from semipd_engine.registry import Registry

ROLES = ("both", "prefill", "decode")


@dataclass(frozen=True)
class PoolNode:
    """One paged KV pool (and its allocator)."""

    name: str  # also its metrics label
    # Its part of the engine's KV budget (engine.kv_cache_mb / engine.num_kv_blocks) where the units share one
    # memory (CPU); on devices with their own memory (GPUs), its part of its unit's memory relative to the other
    # pools there.
    kv_fraction: float = 1.0
    unit: int = 0  # the device whose memory holds it


@dataclass(frozen=True)
class WorkerNode:
    """One loop of schedule -> run -> update: a process on the real backend, a `SimWorker` in the simulator."""

    name: str
    role: str  # "both" | "prefill" | "decode"
    policy: str  # semipd_engine.core.policies
    pool: str
    unit: int = 0
    share: Optional[int] = None  # percent of its unit under partition control (semi-PD); None: the whole unit
    handoff: Optional[str] = None  # how prefilled requests leave it: "adopt" | "transfer" (semipd_engine.core.handoff)
    decode_peers: tuple[str, ...] = ()  # where its hand-offs go, round robin
    prefill_peers: tuple[str, ...] = ()  # where requests it evicts go back to, round robin


@dataclass(frozen=True)
class Topology:
    engine: str
    workers: tuple[WorkerNode, ...]
    pools: tuple[PoolNode, ...]
    entry: tuple[str, ...]  # where new requests go, round robin
    shared_weights: bool = False  # one copy of the weights for every worker, loaded once by the engine
    controller: Optional[str] = None  # "slo": the SLO-aware partitioner steers the partitioned pair's shares

    def __post_init__(self) -> None:
        names = [w.name for w in self.workers]
        pools = {p.name: p for p in self.pools}
        where = f"topology of engine {self.engine!r}"
        if not names or len(set(names)) != len(names):
            raise ValueError(f"{where}: worker names must be unique and there must be one: {names}")
        if len(pools) != len(self.pools):
            raise ValueError(f"{where}: pool names must be unique")
        by_name = {w.name: w for w in self.workers}
        for w in self.workers:
            if w.role not in ROLES:
                raise ValueError(f"{where}: worker {w.name} has role {w.role!r}, not one of {ROLES}")
            if w.pool not in pools:
                raise ValueError(f"{where}: worker {w.name} uses pool {w.pool!r}, which is not declared")
            if w.share is not None and not 1 <= w.share <= 100:
                raise ValueError(f"{where}: worker {w.name} has share {w.share}, not a percentage in [1, 100]")
            for peer in w.decode_peers + w.prefill_peers:
                if peer not in by_name:
                    raise ValueError(f"{where}: worker {w.name} names peer {peer!r}, which is not a worker")
            if (w.role == "prefill") != bool(w.decode_peers) or (w.role == "both") != (w.handoff is None):
                raise ValueError(f"{where}: worker {w.name}: a prefill worker hands off to decode peers, and every "
                                 "phase-split worker names its hand-off")
            for peer in w.decode_peers:
                same = by_name[peer].pool == w.pool
                if by_name[peer].handoff != w.handoff or same != (w.handoff == "adopt"):
                    raise ValueError(f"{where}: {w.name} -> {peer}: both ends name one hand-off; 'adopt' needs one "
                                     "pool, 'transfer' two")
        for e in self.entry:
            if e not in by_name or by_name[e].role == "decode":
                raise ValueError(f"{where}: entry {e!r} must be a prefill or unified worker")
        if self.controller is not None and self.partitioned() is None:
            raise ValueError(f"{where}: a controller needs one prefill and one decode worker sharing a unit")

    # -- reading it ------------------------------------------------------------------------------
    def worker(self, name: str) -> WorkerNode:
        return next(w for w in self.workers if w.name == name)

    @property
    def num_units(self) -> int:
        return 1 + max(n.unit for n in self.workers + self.pools)

    def unit_tp(self, engine_cfg, default_tp: int) -> list[int]:
        """GPUs per unit: a unit of prefill (decode) workers only takes `engine.prefill_tp` (`decode_tp`) where set,
        any other `default_tp` (model.tensor_parallel_size)."""
        out = []
        for u in range(self.num_units):
            roles = {w.role for w in self.workers if w.unit == u}
            key = {frozenset({"prefill"}): "prefill_tp", frozenset({"decode"}): "decode_tp"}.get(frozenset(roles))
            out.append((getattr(engine_cfg, key, 0) if key else 0) or default_tp)
        return out

    def users(self, pool: str) -> tuple[WorkerNode, ...]:
        return tuple(w for w in self.workers if w.pool == pool)

    def partitioned(self) -> Optional[tuple[WorkerNode, WorkerNode]]:
        """(prefill, decode): the two workers whose shares divide one unit, or None."""
        shared = [w for w in self.workers if w.share is not None]
        if len(shared) != 2:
            return None
        pre = next((w for w in shared if w.role == "prefill"), None)
        dec = next((w for w in shared if w.role == "decode"), None)
        if pre is None or dec is None or pre.unit != dec.unit:
            return None
        return pre, dec

    def describe(self) -> dict[str, Any]:
        """Workers, pools, hand-offs and controller, as plain data (the parity test compares drivers on it)."""
        return {"workers": [dataclasses.asdict(w) for w in self.workers],
                "pools": [dataclasses.asdict(p) for p in self.pools], "entry": list(self.entry),
                "shared_weights": self.shared_weights, "controller": self.controller}


# -- the registry ----------------------------------------------------------------------------------------
# Keys every engine this project runs reads (budgets, pool sizing, threads, restarts).
COMMON_KEYS = frozenset({"name", "max_num_seqs", "max_num_batched_tokens", "block_size", "num_kv_blocks",
                         "kv_cache_mb", "watermark", "num_threads", "max_worker_restarts",
                         "enable_prefix_caching"})
CONTROLLER_KEYS = frozenset({"slo_ttft_s", "slo_tpot_s", "slo_percentile", "control_window_s", "step_size",
                             "max_step", "min_share", "max_share", "decision_log", "futile_cap_windows",
                             "futile_fraction"})


@dataclass(frozen=True)
class EngineKind:
    """A registered engine: the function that composes it (None: launched by command, not composed here), the
    engine-specific config keys it reads, beyond `COMMON_KEYS`, and the serving software it stands for when
    simulated (`stack=auto`; semipd_engine/sim/stack.py)."""

    build: Optional[Callable[[Any], Topology]]
    keys: frozenset[str] = frozenset()
    stack: str = "generic"


TOPOLOGIES: Registry[EngineKind] = Registry("engine", "engine.name")


def register(name: str, keys: frozenset[str] | set[str] = frozenset(), stack: str = "generic"):
    """`@register("my_engine", keys={"prefill_share"}, stack="vllm-v1")` over `def my_engine(engine_cfg) ->
    Topology`."""

    def deco(fn: Callable[[Any], Topology]) -> Callable[[Any], Topology]:
        TOPOLOGIES.register(name, EngineKind(fn, frozenset(keys), stack))
        return fn

    return deco
