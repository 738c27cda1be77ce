"""Compose a simulated engine from the same configs a real one takes.

Every check that can fail (unknown engine, policy, hardware or model, a TP that
does not divide the heads, a model that does not fit, a missing profile) runs
here, before any request is simulated, and names the config key.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Optional

from semipd_engine.control.loop import ControlLoop
from semipd_engine.core.block_pool import BlockPool
from semipd_engine.core.clock import VirtualClock
from semipd_engine.core.policies import make_scheduler
from semipd_engine.shares.partition import unit_cores
from semipd_engine.sim.batch import CostModel
from semipd_engine.sim.executor import SIM_TOKEN, CostModelExecutor
from semipd_engine.sim.share import ShareModel, ShareModels
from semipd_engine.sim.simulator import LinkConfig, Simulator, SimWorker
from semipd_engine.sim.stack import FIELDS, IDEAL, ServingStack, resolve
from semipd_engine.topology.engines import build_topology, engine_kind, engine_names
from semipd_engine.topology.graph import Topology

DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
CPU_LINK_GBS = 1.4  # this project's shared-memory block copy, measured (docs/benchmarks.md, disagg)


@dataclass
class Platform:
    """What runs the model: cost model(s), memory, how compute shares and KV links behave."""

    cost_for: Callable[[Any], CostModel]  # a unit's threads (CPU) or GPUs (0: the model's TP) -> its cost model
    devices: int  # cores (CPU) or GPUs per replica
    kv_tokens: int  # KV tokens one replica holds
    share_models: ShareModels
    link: LinkConfig
    kv_bytes_per_token: int
    max_position_embeddings: int
    describe: str
    request_delay_s: float = 0.0  # from a request's arrival to the engine seeing it (server, tokenizer, IPC)
    kv_tokens_for: Optional[Callable[[int], int]] = None  # GPUs of a unit -> KV tokens it holds (None: kv_tokens)
    stack: ServingStack = IDEAL  # the serving software's host costs (a CPU profile measured its own: none added)


def _shape(model_cfg):
    from semipd_engine.sim.shapes import ModelShape

    if model_cfg.path:
        cfg = os.path.join(model_cfg.path, "config.json")
        if not os.path.isfile(cfg):
            raise ValueError(f"model.path={model_cfg.path}: no config.json there")
        return ModelShape.from_hf_config(cfg)
    return ModelShape.preset(model_cfg.name)


def _dtype_bytes(model_cfg, auto: str = "bfloat16") -> int:
    """Bytes per element; `auto` is what the modelled device would pick (every GPU preset has bfloat16; a CPU
    profile, the dtype it was measured in)."""
    dtype = auto if model_cfg.dtype == "auto" else model_cfg.dtype
    if dtype not in DTYPE_BYTES:
        raise ValueError(f"model.dtype must be auto or one of {sorted(DTYPE_BYTES)}, got {model_cfg.dtype!r}")
    return DTYPE_BYTES[dtype]


def _share_models(backend, default: ShareModels) -> ShareModels:
    def pick(a, b, d: ShareModel) -> ShareModel:
        return ShareModel(d.a if a is None else a, d.b if b is None else b)

    return ShareModels(pick(backend.prefill_share_a, backend.prefill_share_b, default.prefill),
                       pick(backend.decode_share_a, backend.decode_share_b, default.decode),
                       default.contention if backend.contention is None else backend.contention)


def gpu_platform(model_cfg, engine_cfg, hardware_cfg, backend) -> Platform:
    from semipd_engine.sim.hardware import Hardware
    from semipd_engine.sim.roofline import RooflineCostModel

    shape = _shape(model_cfg)
    hw = Hardware.preset(hardware_cfg.name)
    stack = resolve(backend.stack, engine_kind(engine_cfg.name).stack, backend.overhead_s)
    tp = model_cfg.tensor_parallel_size
    dtype_bytes = _dtype_bytes(model_cfg)
    costs: dict[int, RooflineCostModel] = {}

    def cost_for(unit_tp: int) -> RooflineCostModel:
        # Host time is the stack's: the roofline prices the device alone.
        unit_tp = unit_tp or tp
        if unit_tp not in costs:
            costs[unit_tp] = RooflineCostModel(shape, hw, unit_tp, dtype_bytes, overhead_s=0.0)
        return costs[unit_tp]

    def kv_tokens_for(unit_tp: int) -> int:
        if engine_cfg.num_kv_blocks:  # an explicit pool size wins over what the memory would hold
            return engine_cfg.num_kv_blocks * engine_cfg.block_size
        return cost_for(unit_tp).max_kv_tokens(backend.kv_mem_fraction)

    for key in ("prefill_tp", "decode_tp"):  # a layout that cannot run fails here, naming its key
        unit_tp = getattr(engine_cfg, key, 0)
        if unit_tp:
            try:
                cost_for(unit_tp)
            except ValueError as e:
                raise ValueError(f"engine.{key}={unit_tp}: " + str(e).replace(
                    f"model.tensor_parallel_size={unit_tp}", "this tensor parallelism")) from None
    cost = cost_for(tp)
    link_bw = (backend.link_bandwidth_gbs * 1e9) if backend.link_bandwidth_gbs else hw.link_bw
    # with TP, each rank sends its own shard over its own link: the fewer ranks of the two sides set the pace
    link_tp = min(getattr(engine_cfg, "prefill_tp", 0) or tp, getattr(engine_cfg, "decode_tp", 0) or tp)
    return Platform(
        cost_for=cost_for, devices=tp, kv_tokens=kv_tokens_for(tp), kv_tokens_for=kv_tokens_for,
        share_models=_share_models(backend, ShareModels()),
        link=LinkConfig(link_bw * link_tp, backend.link_fixed_s, backend.layerwise_overlap, shape.num_layers),
        kv_bytes_per_token=cost.kv_bytes_per_token_per_gpu() * tp,
        max_position_embeddings=shape.max_position_embeddings,
        describe=f"roofline {shape.name} on {tp}x {hw.name} (calibrated on {hw.calibrated_on}), stack {stack.name}",
        request_delay_s=stack.request_s, stack=stack)


class CoreShares:
    """CPU compute shares: a share is a core set (as the real engine pins it); its cost comes from the profile."""

    def __init__(self, profile, phase: str, cores: int):
        self.profile, self.phase, self.cores = profile, phase, cores

    def factor(self, share_pct: float) -> float:
        n = min(self.cores, max(1, round(share_pct / 100 * self.cores)))
        return self.profile.share_factor(self.phase, n, self.cores)


def cpu_platform(model_cfg, engine_cfg, backend) -> Platform:
    from semipd_engine.sim.profile import Profile

    if not backend.profile_path:
        raise ValueError("backend.profile_path is required with backend.cost_model=profile "
                         "(make one with `python -m semipd_engine.sim.profile --model NAME --out FILE`)")
    stack = getattr(backend, "stack", None)
    if stack is not None and (stack.name != "auto" or any(getattr(stack, f) is not None for f in FIELDS)):
        raise ValueError(f"stack={stack.name} applies to the roofline (GPU) cost model only: a CPU profile measured "
                         "this project's own host costs; remove the stack override or use backend.cost_model=roofline")
    if backend.overhead_s is not None:
        raise ValueError("backend.overhead_s applies to the roofline (GPU) cost model only: a CPU profile measured "
                         "its host costs")
    profile = Profile.load(backend.profile_path)
    shape = _shape(model_cfg)
    cores = profile.cores
    kv_per_token = shape.kv_bytes_per_token(_dtype_bytes(model_cfg, auto=profile.data.get("dtype", "float32")))
    blocks = engine_cfg.num_kv_blocks or max(1, engine_cfg.kv_cache_mb * 2**20 // (kv_per_token * engine_cfg.block_size))
    shares = ShareModels(CoreShares(profile, "prefill", cores), CoreShares(profile, "decode", cores), 1.0)
    link_gbs = backend.link_bandwidth_gbs or CPU_LINK_GBS
    return Platform(
        cost_for=lambda threads: profile.cost_model(threads or cores), devices=cores,
        kv_tokens=blocks * engine_cfg.block_size, share_models=shares,
        link=LinkConfig(link_gbs * 1e9, backend.link_fixed_s, backend.layerwise_overlap, shape.num_layers),
        kv_bytes_per_token=kv_per_token, max_position_embeddings=shape.max_position_embeddings,
        describe=f"profile {profile.data.get('model')} on {cores} CPU cores ({backend.profile_path})",
        request_delay_s=profile.request_s)


def make_platform(model_cfg, engine_cfg, hardware_cfg, backend) -> Platform:
    if backend.cost_model == "roofline":
        if hardware_cfg.name == "cpu":
            raise ValueError("hardware.name=cpu needs backend.cost_model=profile (the roofline models GPUs)")
        return gpu_platform(model_cfg, engine_cfg, hardware_cfg, backend)
    if backend.cost_model == "profile":
        return cpu_platform(model_cfg, engine_cfg, backend)
    raise ValueError(f"backend.cost_model must be 'roofline' or 'profile', got {backend.cost_model!r}")


def build_simulator(model_cfg, engine_cfg, hardware_cfg, backend) -> tuple[Simulator, Platform]:
    """The engine `engine_cfg.name`, composed from its topology (the one the process driver runs), on a virtual
    clock: the same policies, pools, hand-offs and controller; time from the platform's cost model."""
    topo, plat = validate(model_cfg, engine_cfg, hardware_cfg, backend)
    return simulate(topo, model_cfg, engine_cfg, plat, backend), plat


def validate(model_cfg, engine_cfg, hardware_cfg, backend) -> tuple[Topology, Platform]:
    """Every check a simulated job can fail, naming its config key, without building the simulator."""
    if engine_kind(engine_cfg.name).build is None:
        raise ValueError(f"engine.name={engine_cfg.name!r} has no simulated composition (it is launched by its "
                         f"command); valid: {sim_engines()}")
    return build_topology(engine_cfg), make_platform(model_cfg, engine_cfg, hardware_cfg, backend)


def sim_engines() -> list[str]:
    return [n for n in engine_names() if engine_kind(n).build is not None]


def simulate(topo: Topology, model_cfg, engine_cfg, plat: Platform, backend) -> Simulator:
    """The event driver's side of a topology: a `SimWorker` per worker, a `BlockPool` per pool.

    Units, as the process driver places them: on a CPU profile one unit has every core, several split the
    cores between them as `partition.unit_cores` does and one KV budget by the pools' fractions; on a GPU each unit is a GPU
    (TP group) with its own memory, divided between the pools on it.
    """
    e, bs = engine_cfg, engine_cfg.block_size
    cpu = backend.cost_model == "profile"
    n = topo.num_units
    # a unit's cost model key: its cores on a CPU profile, its GPUs (TP degree) on the roofline
    units = ([len(c) for c in unit_cores(n, range(plat.devices))] if n > 1 else [0] * n) if cpu \
        else topo.unit_tp(e, model_cfg.tensor_parallel_size)

    def kv_fraction(p) -> float:
        return p.kv_fraction if cpu else p.kv_fraction / sum(q.kv_fraction for q in topo.pools if q.unit == p.unit)

    def kv_tokens(p) -> int:
        return plat.kv_tokens if cpu or plat.kv_tokens_for is None else plat.kv_tokens_for(units[p.unit])

    pools = {p.name: BlockPool(max(1, int(kv_tokens(p) * kv_fraction(p)) // bs), bs, e.watermark,
                                 e.enable_prefix_caching)
             for p in topo.pools}

    def max_len(p: BlockPool) -> int:
        cap = (p.num_blocks - p.watermark_blocks) * bs
        return min(model_cfg.max_model_len or plat.max_position_embeddings, plat.max_position_embeddings, cap)

    workers = {}
    for w in topo.workers:
        pool = pools[w.pool]
        sched = make_scheduler(w.policy, pool, e, max_len(pool))
        sched.emit_outputs = False  # nothing streams: results are read off the requests' timestamps
        if backend.decode_group and not sched.hands_off:
            sched.enable_decode_group(SIM_TOKEN)
        workers[w.name] = SimWorker(w.name, w.role, sched, CostModelExecutor(plat.cost_for(units[w.unit]),
                                                                             plat.stack),
                                    share=100 if w.share is None else w.share, handoff_kind=w.handoff,
                                    peers=w.decode_peers if w.role == "prefill" else w.prefill_peers)
    pair = topo.partitioned()
    share_models, control = None, None
    if pair is not None:  # one unit divided by shares: each one's speed depends on its share and the other
        pre, dec = workers[pair[0].name], workers[pair[1].name]
        pre.colocated, dec.colocated = dec, pre
        share_models = plat.share_models
    if topo.controller == "slo":  # the real loop; on CPU only partitions placed differently are distinct steps
        control = ControlLoop(e, range(plat.devices) if cpu else None, keep_inputs=True)
    return Simulator(list(workers.values()), list(topo.entry), VirtualClock(), share_models, plat.link,
                     plat.kv_bytes_per_token * bs, control, backend.switch_cost_s, backend.fast_forward)
