"""The engines this project compares, each one topology function (semipd_engine.topology.graph).

- `unified`, `unified_chunked` (vLLM / SGLang, Sarathi): one worker runs both phases with `engine.policy`.
- `disagg` (DistServe): prefill and decode instances, each on its own unit with its own weights and pool;
  a prefilled request's KV blocks are copied to a decode instance (`transfer`). On one host the KV budget is
  split by `engine.prefill_kv_fraction`.
- `semipd`: a prefill and a decode worker on one unit, dividing it by their shares, over one pool and one
  copy of the weights; the decode worker adopts the prefilled request's blocks in place (`adopt`).
- `semipd_dynamic`: semi-PD whose shares the SLO-aware partitioner moves at run time.
- `external`: a server launched from a command template (experiments/sweep/launch.py), not composed here.

Below them, the lookups every caller uses: an engine by name, its config checked, its topology built.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from semipd_engine.topology.graph import (
    COMMON_KEYS,
    CONTROLLER_KEYS,
    TOPOLOGIES,
    EngineKind,
    PoolNode,
    Topology,
    WorkerNode,
    register,
)

SHARE_KEYS = frozenset({"prefill_share", "decode_share", "partition_backend"})


# Simulated, each engine is charged the host costs of the program it stands for in the paper's comparison
# (vLLM 0.6.0, DistServe, the semi-PD fork); `stack=NAME` charges one stack to all.
@register("unified", keys={"policy"}, stack="vllm-0.6")
@register("unified_chunked", keys={"policy"}, stack="vllm-0.6")
def unified(e) -> Topology:
    return Topology(e.name, (WorkerNode("unified", "both", e.policy, "unified"),), (PoolNode("unified"),),
                    entry=("unified",))


def semi_pd(e, controller=None) -> Topology:
    workers = (WorkerNode("prefill", "prefill", "prefill_only", "shared", share=e.prefill_share, handoff="adopt",
                          decode_peers=("decode",)),
               WorkerNode("decode", "decode", "decode_only", "shared", share=e.decode_share, handoff="adopt",
                          prefill_peers=("prefill",)))
    return Topology(e.name, workers, (PoolNode("shared"),), entry=("prefill",), shared_weights=True,
                    controller=controller)


register("semipd", keys=SHARE_KEYS, stack="semipd")(semi_pd)


@register("semipd_dynamic", keys=SHARE_KEYS | CONTROLLER_KEYS, stack="semipd")
def semi_pd_dynamic(e) -> Topology:
    return semi_pd(e, controller="slo")


@register("disagg", keys={"num_prefill_instances", "num_decode_instances", "prefill_kv_fraction", "prefill_tp",
                          "decode_tp"}, stack="distserve")
def disagg(e) -> Topology:
    n_p, n_d = e.num_prefill_instances, e.num_decode_instances
    if n_p < 1 or n_d < 1:
        raise ValueError("engine.num_prefill_instances and engine.num_decode_instances must be >= 1")
    if not 0.0 < e.prefill_kv_fraction < 1.0:
        raise ValueError("engine.prefill_kv_fraction must be in (0, 1)")
    for key in ("prefill_tp", "decode_tp"):
        if getattr(e, key) < 0:
            raise ValueError(f"engine.{key} must be >= 1 (or 0: model.tensor_parallel_size), got {getattr(e, key)}")
    prefills = tuple(f"prefill{i}" for i in range(n_p))
    decodes = tuple(f"decode{i}" for i in range(n_d))
    workers = ([WorkerNode(n, "prefill", "prefill_only", n, unit=i, handoff="transfer", decode_peers=decodes)
                for i, n in enumerate(prefills)]
               + [WorkerNode(n, "decode", "decode_only", n, unit=n_p + j, handoff="transfer", prefill_peers=prefills)
                  for j, n in enumerate(decodes)])
    pools = ([PoolNode(n, e.prefill_kv_fraction / n_p, unit=i) for i, n in enumerate(prefills)]
             + [PoolNode(n, (1 - e.prefill_kv_fraction) / n_d, unit=n_p + j) for j, n in enumerate(decodes)])
    return Topology(e.name, tuple(workers), tuple(pools), entry=prefills)


# Its command template reads the shares ({prefill_share}, {decode_share}) and its own block.
TOPOLOGIES.register("external", EngineKind(None, frozenset({"prefill_share", "decode_share", "external"})))


# -- lookups ---------------------------------------------------------------------------------------------

def engine_kind(name: str) -> EngineKind:
    return TOPOLOGIES.get(name)


def engine_names() -> list[str]:
    return TOPOLOGIES.names()


def inapplicable_keys(engine_cfg) -> list[str]:
    """The config keys set away from their defaults that `engine_cfg.name` does not read."""
    from semipd_engine.config import EngineConfig

    kind = engine_kind(engine_cfg.name)
    defaults = EngineConfig()
    out = []
    for f in dataclasses.fields(EngineConfig):
        if f.name in COMMON_KEYS or f.name in kind.keys:
            continue
        value, default = getattr(engine_cfg, f.name), getattr(defaults, f.name)
        if dataclasses.is_dataclass(value):
            value = dataclasses.asdict(value)
            default = dataclasses.asdict(default)
            out += [f"{f.name}.{k}" for k in value if value[k] != default.get(k)]
        elif value != default:
            out.append(f.name)
    return out


def check_engine_config(engine_cfg) -> None:
    """Fail, naming the key and the engine, on a key this engine does not read (before anything starts)."""
    bad = inapplicable_keys(engine_cfg)
    if bad:
        kind = engine_kind(engine_cfg.name)
        reads = ", ".join(sorted(kind.keys)) or "none beyond the common ones"
        raise ValueError(f"engine.{bad[0]}={_value(engine_cfg, bad[0])!r} does not apply to engine "
                         f"{engine_cfg.name!r}" + (f" (nor {', '.join('engine.' + b for b in bad[1:])})"
                                                   if len(bad) > 1 else "")
                         + f"; the engine-specific keys it reads: {reads}. Remove it, or choose an engine that "
                         "reads it.")


def retarget(engine_cfg, name: str, **overrides):
    """`engine_cfg` as engine `name` (a reference engine measured beside the configured one): the common keys
    kept, the keys `name` does not read back at their defaults, then `overrides`."""
    from semipd_engine.config import EngineConfig

    kind, defaults = engine_kind(name), EngineConfig()
    reset = {f.name: getattr(defaults, f.name) for f in dataclasses.fields(EngineConfig)
             if f.name not in COMMON_KEYS and f.name not in kind.keys}
    if "external" in reset and dataclasses.is_dataclass(engine_cfg.external):
        reset["external"] = type(engine_cfg.external)()  # the frozen twin, at its defaults
    return dataclasses.replace(engine_cfg, **{**reset, "name": name, **overrides})


def _value(cfg, dotted: str) -> Any:
    for part in dotted.split("."):
        cfg = getattr(cfg, part)
    return cfg


def build_topology(engine_cfg) -> Topology:
    """The engine `engine_cfg.name` as data; its config checked first."""
    kind = engine_kind(engine_cfg.name)
    if kind.build is None:
        raise ValueError(f"engine.name={engine_cfg.name!r} is launched by its command, not composed by this "
                         "project's drivers")
    check_engine_config(engine_cfg)
    return kind.build(engine_cfg)
