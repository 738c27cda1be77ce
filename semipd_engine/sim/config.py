"""Structured configs of the `backend` and `hardware` Hydra groups."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional


@dataclass
class StackConfig:
    """The `stack` group (package `backend.stack`): a serving-stack preset and any field overridden.

    `auto` is each engine's own stack (vLLM 0.6 for unified, DistServe for disagg, the semi-PD fork for
    semipd); a preset name charges that stack to every engine (a like-for-like comparison). Unset fields keep
    the preset's values. Only the roofline (GPU) cost model charges a stack: a CPU profile measured its own.
    """

    name: str = "auto"
    request_s: Optional[float] = None  # per request, arrival to engine (API server, tokenizer, IPC)
    step_s: Optional[float] = None  # per iteration, host time
    per_seq_s: Optional[float] = None  # per iteration and sequence
    per_token_s: Optional[float] = None  # per iteration and new token
    overlap: Optional[bool] = None  # host work beside the GPU's (max) instead of before it (sum)
    multistep: Optional[int] = None  # decode steps per host pass


@dataclass
class BackendConfig:
    # real: this project's engines in worker processes | sim: the same policies on a virtual clock
    name: str = "real"
    # roofline: per-operator GPU model (hardware group) | profile: a table measured on this machine
    cost_model: str = "roofline"
    profile_path: Optional[str] = None  # the `profile` cost model's file (python -m semipd_engine.sim.profile)
    fast_forward: bool = True  # advance unchanged decode batches many iterations at a time (exact)
    # decoding requests kept as one group, their tokens materialised when they finish (exact; core/decode_group.py)
    decode_group: bool = True
    kv_mem_fraction: float = 0.9  # GPU memory for weights + KV cache (vLLM's gpu_memory_utilization)
    # per-iteration host time; when set it replaces the serving stack's `step_s` (the key older runs used)
    overhead_s: Optional[float] = None
    # semi-PD compute share: time(f) = time(100%) * (a/f + b); None = the published MPS fits (A100)
    prefill_share_a: Optional[float] = None
    prefill_share_b: Optional[float] = None
    decode_share_a: Optional[float] = None
    decode_share_b: Optional[float] = None
    contention: Optional[float] = None  # slowdown of decode while prefill runs on the same device
    switch_cost_s: float = 0.0  # stall when a worker applies a new share (CPU measured: ~56 us)
    # disaggregated KV transfer: link bandwidth (None = NVLink of the hardware; this machine's memcpy on CPU)
    link_bandwidth_gbs: Optional[float] = None
    link_fixed_s: float = 0.0
    layerwise_overlap: bool = False
    # the serving software's host costs (the `stack` group, conf/stack/; semipd_engine/sim/stack.py)
    stack: StackConfig = field(default_factory=StackConfig)


@dataclass
class HardwareConfig:
    # a GPU preset (a100-40g, a100-80g, h100, h200, h800) for the roofline; "cpu" = this machine (profile)
    name: str = "a100-80g"
