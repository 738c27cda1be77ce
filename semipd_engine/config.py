"""Typed configuration shared by every engine, the server and the experiment runner.

The dataclasses double as Hydra structured-config schemas (registered in
``semipd_engine.conf_store``), so an unknown key or a wrong type fails when the
config is composed, before any process starts. Engines receive frozen copies
(``freeze``) so nothing mutates a config after start-up.
"""

from __future__ import annotations

import dataclasses
import functools
import typing
from dataclasses import dataclass, field
from typing import Any, Optional, TypeVar

from omegaconf import DictConfig, OmegaConf


@dataclass
class ModelConfig:
    # A preset name from semipd_engine.model.presets, used when `path` is unset.
    name: str = "tiny"
    # A local Hugging Face checkpoint directory (config.json + *.safetensors).
    path: Optional[str] = None
    # Tokenizer directory; defaults to `path`, else the built-in byte-level BPE.
    tokenizer: Optional[str] = None
    # auto | float32 | bfloat16 | float16. auto: bfloat16 where the device multiplies it natively (measured once
    # per machine on a CPU), else float32 (semipd_engine/model/dtype.py).
    dtype: str = "auto"
    seed: int = 0
    # Longest prompt + output the engine accepts; 0 means the model's own limit.
    max_model_len: int = 0
    attention_backend: str = "auto"  # auto | torch | triton
    device: str = "cpu"
    # CUDA graphs for decode-only iterations (runtime/cuda_graph.py), on CUDA only: batch sizes bucketed up to
    # min(cuda_graph_max_bs, engine.max_num_seqs). enforce_eager (vLLM's flag) turns them off.
    enforce_eager: bool = False
    cuda_graph_max_bs: int = 256
    # GPUs per model replica (the simulator models it; external engines get it as a flag).
    tensor_parallel_size: int = 1


@dataclass
class ExternalConfig:
    """An engine this project does not implement (vLLM, SGLang, the semi-PD fork, any OpenAI-compatible server).

    `command` is a template; its {placeholders} come from the job's config: {python} {host} {port} {model}
    {served_model_name} {tp} {dtype} {max_num_seqs} {max_num_batched_tokens} {max_model_len} {block_size}
    {prefill_share} {decode_share} {extra_args}. `env` values and `version_command` are templated the same way.
    """

    command: Optional[str] = None
    # The Python of the engine's own environment ({python}: an engine such as vLLM's CPU build pins its own
    # torch and is installed in a virtual environment of its own); empty: the Python running this harness.
    python: str = ""
    url: Optional[str] = None  # attach: drive the server already running at this URL; launch nothing
    env: dict[str, str] = field(default_factory=dict)
    extra_args: str = ""  # appended where the template says {extra_args}
    health_path: str = "/health"
    startup_timeout_s: float = 900.0
    version_command: Optional[str] = None  # recorded in the job's provenance (stdout of this command)
    # canonical name (requests_running, requests_waiting, kv_usage) -> this engine's Prometheus metric
    metrics: dict[str, str] = field(default_factory=dict)
    metrics_interval_s: float = 1.0


@dataclass
class EngineConfig:
    # Registry name (semipd_engine.registry): unified, unified_chunked, ...
    name: str = "unified"
    # Scheduler policy: prefill_priority | chunked (see semipd_engine.core.scheduler).
    policy: str = "prefill_priority"
    max_num_seqs: int = 64
    # Token budget of one iteration. For `chunked` it is the Sarathi chunk budget.
    max_num_batched_tokens: int = 2048
    block_size: int = 16
    # KV pool size: an explicit block count, or (when 0) derived from kv_cache_mb.
    num_kv_blocks: int = 0
    kv_cache_mb: int = 256
    # Admission keeps this fraction of the pool free for running decodes.
    watermark: float = 0.01
    # Reuse the KV of a prompt's cached full-block prefix (vLLM's default; a block is shared, never copied).
    enable_prefix_caching: bool = True
    # Intra-op threads per worker; 0 = as many as the worker's cores (semi-PD: its share of them where the
    # two phases' core sets overlap, so the workers never run more threads than there are cores).
    num_threads: int = 0
    # A worker that dies (crash, kill -9) fails the requests in flight and the engine replaces its workers;
    # this many replacements are allowed within any 60 s (0 = a dead worker leaves the engine down).
    max_worker_restarts: int = 5
    # semi-PD compute shares (percent caps of the device); used by semipd engines.
    prefill_share: int = 100
    decode_share: int = 100
    # auto | cpu_quota | cpu_affinity | green_context | mps | none (semipd_engine/shares/partition.py). auto on a CPU:
    # cpu_quota (fractions of CPU time) where a cgroup cpu controller is writable, else cpu_affinity (core sets).
    partition_backend: str = "auto"
    # semipd_dynamic: SLO-aware partitioning (the runner fills the SLOs from the `slo` group).
    slo_ttft_s: float = 1.0
    slo_tpot_s: float = 0.1
    slo_percentile: float = 90.0
    control_window_s: float = 5.0
    step_size: int = 10
    max_step: int = 3
    min_share: int = 10
    max_share: int = 100
    # An extension of Algorithm 1 (control/slo_partitioner.py): a raise whose next window shows less than
    # futile_fraction of the latency fall the model predicted is undone, and the phase capped at its old share for
    # futile_cap_windows windows. 0 = Algorithm 1 as published.
    futile_cap_windows: int = 0
    futile_fraction: float = 0.25
    decision_log: Optional[str] = None  # JSONL of every decision (the runner saves it with the job)
    # Disaggregated baseline: instance counts and KV memory split.
    num_prefill_instances: int = 1
    num_decode_instances: int = 1
    prefill_kv_fraction: float = 0.5
    # GPUs per prefill / decode instance (DistServe searches them apart, e.g. prefill TP2 with decode TP1);
    # 0 = model.tensor_parallel_size. Simulated only: this project's real engine runs one device per worker.
    prefill_tp: int = 0
    decode_tp: int = 0
    # name=external: a server launched from a command template, or attached to by URL (experiments/sweep/launch.py)
    external: ExternalConfig = field(default_factory=ExternalConfig)


@dataclass
class ServerConfig:
    host: str = "127.0.0.1"
    port: int = 8000
    # Seconds to wait at start-up for the engine workers to load the model.
    startup_timeout_s: float = 300.0
    # On SIGTERM, in-flight requests get this long to finish before they are failed.
    drain_timeout_s: float = 5.0
    # Optional JSONL file of per-request server-side lifecycle timestamps.
    request_log: Optional[str] = None
    served_model_name: Optional[str] = None
    log_level: str = "INFO"
    # Require `Authorization: Bearer <api_key>` on every endpoint but /health and /metrics (default: the
    # SEMIPD_API_KEY environment variable, else none). Binding a non-loopback host without one logs a warning.
    api_key: Optional[str] = None


@dataclass
class ServeConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    engine: EngineConfig = field(default_factory=EngineConfig)
    server: ServerConfig = field(default_factory=ServerConfig)


T = TypeVar("T")


def freeze(cls: type[T], cfg: Any) -> T:
    """Build a frozen instance of dataclass ``cls`` from a DictConfig/dict/dataclass."""
    if isinstance(cfg, DictConfig):
        cfg = OmegaConf.to_container(cfg, resolve=True)
    elif dataclasses.is_dataclass(cfg):
        cfg = dataclasses.asdict(cfg)
    hints, names = _fields(cls)
    unknown = set(cfg) - names
    if unknown:
        raise ValueError(f"unknown {cls.__name__} key(s): {sorted(unknown)}")
    kwargs = {}
    for name, value in cfg.items():
        if dataclasses.is_dataclass(hints[name]) and value is not None:
            value = freeze(hints[name], value)
        kwargs[name] = value
    return _frozen_twin(cls)(**kwargs)


@functools.cache
def _fields(cls: type) -> tuple[dict[str, Any], frozenset[str]]:
    # the annotations are strings (postponed evaluation): resolving them took half of a freeze
    return typing.get_type_hints(cls), frozenset(f.name for f in dataclasses.fields(cls))


_FROZEN: dict[type, type] = {}


def _frozen_twin(cls: type) -> type:
    # Hydra needs mutable schemas to merge overrides; engines get a frozen twin
    # with the same fields, so a config cannot change after start-up.
    if cls not in _FROZEN:
        _FROZEN[cls] = dataclasses.make_dataclass(
            "Frozen" + cls.__name__,
            [(f.name, f.type, f) for f in dataclasses.fields(cls)],
            frozen=True,
            namespace={"__module__": cls.__module__, "__doc__": cls.__doc__},
        )
    return _FROZEN[cls]


# Module-level names so frozen configs pickle into spawned worker processes.
FrozenModelConfig = _frozen_twin(ModelConfig)
FrozenExternalConfig = _frozen_twin(ExternalConfig)
FrozenEngineConfig = _frozen_twin(EngineConfig)
FrozenServerConfig = _frozen_twin(ServerConfig)
FrozenServeConfig = _frozen_twin(ServeConfig)
