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

from semipd_engine.block_pool import BlockPool
from semipd_engine.clock import VirtualClock
from semipd_engine.kv_transfer import TransferQueue
from semipd_engine.partition import Partition, placement
from semipd_engine.policies import make_scheduler
from semipd_engine.sim.batch import CostModel
from semipd_engine.sim.executor import CostModelExecutor
from semipd_engine.sim.share import ShareModel, ShareModels
from semipd_engine.sim.simulator import LinkConfig, Simulator, SimWorker

DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
SIM_ENGINES = ("unified", "unified_chunked", "disagg", "semipd", "semipd_dynamic")
CPU_LINK_GBS = 1.4  # this project's shared-memory block copy, measured (docs/benchmarks.md, disagg)


@dataclass
class Platform:
    """What runs the model: cost model(s), memory, how compute shares and KV links behave."""

    cost_for: Callable[[Any], CostModel]  # threads/GPU share key -> cost model at full share of that unit
    devices: int  # cores (CPU) or GPUs per replica
    kv_tokens: int  # KV tokens one replica holds
    share_models: ShareModels
    link: LinkConfig
    kv_bytes_per_token: int
    max_position_embeddings: int
    describe: str
    request_delay_s: float = 0.0  # from a request's arrival to the engine seeing it (server, tokenizer, IPC)


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
    kw = {} if backend.overhead_s is None else {"overhead_s": backend.overhead_s}
    cost = RooflineCostModel(shape, hw, model_cfg.tensor_parallel_size, _dtype_bytes(model_cfg), **kw)
    link_bw = (backend.link_bandwidth_gbs * 1e9) if backend.link_bandwidth_gbs else hw.link_bw
    tp = model_cfg.tensor_parallel_size
    kv_tokens = cost.max_kv_tokens(backend.kv_mem_fraction)
    if engine_cfg.num_kv_blocks:  # an explicit pool size wins over what the memory would hold
        kv_tokens = engine_cfg.num_kv_blocks * engine_cfg.block_size
    return Platform(
        cost_for=lambda unit: cost, devices=tp, kv_tokens=kv_tokens,
        share_models=_share_models(backend, ShareModels()),
        # with TP, each rank sends its own shard over its own link: the replica's bytes move tp links at once
        link=LinkConfig(link_bw * tp, backend.link_fixed_s, backend.layerwise_overlap, shape.num_layers),
        kv_bytes_per_token=cost.kv_bytes_per_token_per_gpu() * tp,
        max_position_embeddings=shape.max_position_embeddings,
        describe=f"roofline {shape.name} on {tp}x {hw.name} (calibrated on {hw.calibrated_on})")


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


def build_simulator(model_cfg, engine_cfg, hardware_cfg, backend, controller=None) -> tuple[Simulator, Platform]:
    """The simulated twin of `engine_cfg.name`: the same policies, pools and hand-offs, on a virtual clock."""
    if engine_cfg.name not in SIM_ENGINES:
        raise ValueError(f"engine.name={engine_cfg.name!r} has no simulated composition; valid: {SIM_ENGINES}")
    plat = make_platform(model_cfg, engine_cfg, hardware_cfg, backend)
    e, bs = engine_cfg, engine_cfg.block_size
    cpu = backend.cost_model == "profile"

    def pool(tokens: int) -> BlockPool:
        return BlockPool(max(1, tokens // bs), bs, e.watermark)

    def max_len(p: BlockPool) -> int:
        cap = (p.num_blocks - p.watermark_blocks) * bs
        return min(model_cfg.max_model_len or plat.max_position_embeddings, plat.max_position_embeddings, cap)

    def worker(name, role, policy, p, cost, **kw) -> SimWorker:
        sched = make_scheduler(policy, p, e, max_len(p))
        sched.emit_outputs = False  # nothing streams: results are read off the requests' timestamps
        return SimWorker(name, role, sched, CostModelExecutor(cost), **kw)

    share_models = None
    if e.name in ("unified", "unified_chunked"):
        p = pool(plat.kv_tokens)
        workers = [worker("unified", "both", e.policy, p, plat.cost_for(0))]
        entry = ["unified"]
    elif e.name in ("semipd", "semipd_dynamic"):
        p = pool(plat.kv_tokens)  # one pool, one weight copy
        part = Partition(e.prefill_share, e.decode_share)
        pre = worker("prefill", "prefill", "prefill_only", p, plat.cost_for(0), share=part.prefill_share,
                     handoff="adopt", peers=("decode",))
        dec = worker("decode", "decode", "decode_only", p, plat.cost_for(0), share=part.decode_share,
                     handoff="adopt", peers=("prefill",))
        pre.colocated, dec.colocated = dec, pre
        workers, entry, share_models = [pre, dec], ["prefill"], plat.share_models
    else:  # disagg: each instance its own device(s), weights and pool
        n_p, n_d = e.num_prefill_instances, e.num_decode_instances
        if n_p < 1 or n_d < 1:
            raise ValueError("engine.num_prefill_instances and engine.num_decode_instances must be >= 1")
        prefills = tuple(f"prefill{i}" for i in range(n_p))
        decodes = tuple(f"decode{i}" for i in range(n_d))
        if cpu:  # the real engine splits this machine's cores and its KV budget between instances
            threads = core_counts(n_p + n_d, plat.devices)
            frac = {**{n: e.prefill_kv_fraction / n_p for n in prefills},
                    **{n: (1 - e.prefill_kv_fraction) / n_d for n in decodes}}
        else:  # a GPU (TP group) per instance, each with its own full memory
            threads = [0] * (n_p + n_d)
            frac = {n: 1.0 for n in prefills + decodes}
        workers = []
        for i, n in enumerate(prefills):
            workers.append(worker(n, "prefill", "prefill_only", pool(int(plat.kv_tokens * frac[n])),
                                  plat.cost_for(threads[i]), handoff="transfer", peers=decodes))
        for j, n in enumerate(decodes):
            p = pool(int(plat.kv_tokens * frac[n]))
            workers.append(worker(n, "decode", "decode_only", p, plat.cost_for(threads[n_p + j]),
                                  handoff="transfer", peers=prefills, transfers=TransferQueue(p, None)))
        entry = list(prefills)
    sim = Simulator(workers, entry, VirtualClock(), share_models, plat.link, plat.kv_bytes_per_token * bs,
                    controller, e.control_window_s, backend.switch_cost_s, backend.fast_forward)
    for w in workers:  # the link mechanism belongs to the simulator: bytes over bandwidth, no copy
        if w.transfers is not None:
            w.transfers.copy = sim._link_copy
    return sim, plat


def core_counts(n: int, cores: int) -> list[int]:
    """Cores per disaggregated instance, as the real engine splits them (at least one each)."""
    per = max(1, cores // n)
    return [per] * n


def make_controller(engine_cfg, cores: Optional[int] = None):
    """semipd_dynamic's partitioner: the real `SLOPartitioner`, with the simulated backend's granularity."""
    from semipd_engine.slo_partitioner import ControllerConfig, SLOPartitioner

    e = engine_cfg
    cfg = ControllerConfig(e.slo_ttft_s, e.slo_tpot_s, e.slo_percentile, e.step_size, e.max_step, e.min_share,
                           e.max_share)
    if cores:  # CPU: only partitions the real engine places differently (cores, threads) are distinct
        return SLOPartitioner(cfg, distinct=lambda a, b: placement(a, range(cores)) != placement(b, range(cores)))
    return SLOPartitioner(cfg)
