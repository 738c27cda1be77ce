"""Structured-config schemas of the load generator (`conf/loadgen.yaml`) and of a job (`conf/config.yaml`)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from semipd_engine.config import EngineConfig, ModelConfig, ServerConfig
from semipd_engine.sim.config import BackendConfig, HardwareConfig


@dataclass
class WorkloadConfig:
    # synthetic | longbench_synthetic | fixed | shift | sharegpt | sharegpt_lengths | mooncake | azure | burstgpt
    name: str = "synthetic"
    path: Optional[str] = None  # dataset or trace file (sharegpt, mooncake, azure, burstgpt)
    num_requests: int = 200
    seed: int = 0
    # Arrivals: poisson | gamma | constant | trace | closed
    arrival: str = "poisson"
    rate: float = 4.0  # requests/s for poisson, gamma, constant
    # Offered load as a fraction of the unified engine's measured capacity on this machine (for this model,
    # dtype and workload; experiments/sweep/capacity.py). When set, the job's rate is load x capacity and
    # `rate` is not read: a sweep says the same regime (below, near, past the knee) on a slow or a fast CPU.
    load: Optional[float] = None
    burstiness: float = 1.0  # gamma shape; 1.0 = Poisson, <1 burstier
    max_concurrency: int = 0  # closed loop: requests in flight; 0 = unlimited (open loop)
    # Length filters (ShareGPT protocol of the semi-PD and DistServe evaluations).
    max_prompt_len: int = 1024
    max_total_len: int = 2048
    min_prompt_len: int = 4
    min_output_len: int = 1
    # Multiply every prompt/output length (replaying long traces on a small model).
    length_scale: float = 1.0
    # Synthetic distributions (log-normal; see experiments/loadgen/workloads.py for sources).
    prompt_mean: float = 161.3
    prompt_sigma: float = 1.1
    output_mean: float = 338.0
    output_sigma: float = 0.9
    # shift workload: the mix changes after `shift_at` of the requests (prompt-heavy -> decode-heavy).
    shift_at: float = 0.5
    shift_prompt_mean: float = 32.0
    shift_output_mean: float = 300.0
    # shared_prefix workload (inference-perf's): requests in `num_prefix_groups` groups, each prompt its group's
    # system prompt of `prefix_len` tokens plus a question (lengths from prompt_mean / prompt_sigma)
    num_prefix_groups: int = 8
    prefix_len: int = 512
    # Multi-turn conversations (sharegpt: the dataset's own turns; synthetic and its kin: drawn turns). Each turn
    # is sent after the previous answer plus a think time, its prompt the whole history plus the new message.
    # `rate` stays requests/s: conversations start at rate / (turns per conversation), by the arrival process.
    multi_turn: bool = False
    history: str = "generated"  # generated (the answers the server gave) | recorded (the dataset's answers)
    think_time_s: float = 1.0  # mean pause between an answer and the next turn
    think_time_dist: str = "exponential"  # exponential | constant | lognormal (sigma: think_time_sigma)
    think_time_sigma: float = 1.0
    turns_mean: float = 3.0  # drawn conversations: turns per conversation (geometric, at least one)
    max_turns: int = 0  # 0 = every turn the dataset has (or draws)
    # fixed-length workload
    prompt_len: int = 128
    output_len: int = 128
    # Traces: time scale (2.0 = twice as fast), window in trace seconds.
    time_scale: float = 1.0
    window_start_s: float = 0.0
    window_s: Optional[float] = None


@dataclass
class SLOConfig:
    name: str = "default"
    ttft_s: float = 1.0
    tpot_s: float = 0.1
    # When set, SLOs = scale x the engine's measured single-request latency (experiments/sweep/slo.py).
    scale: Optional[float] = None
    # Per-SLO multiples of that latency; each, when set, replaces `scale` for its own SLO.
    ttft_scale: Optional[float] = None
    tpot_scale: Optional[float] = None
    # How a request's TPOT is read against tpot_s: mean ((E2E - TTFT) / (output_tokens - 1), the paper's) |
    # p90_itl | p99_itl | max_itl (its own gaps between tokens) | first_to_second. Every run records attainment
    # under each (experiments/analysis/request_metrics.py); this one sets slo_attainment and goodput.
    tpot_definition: str = "mean"
    percentile: float = 90.0
    target_attainment: float = 0.9


@dataclass
class LoadgenConfig:
    base_url: str = "http://127.0.0.1:8000"
    model: Optional[str] = None  # from /v1/models when unset
    output_dir: Optional[str] = None
    # Tokenizer used to build prompts of exact lengths: "builtin", a HF directory, or "none" (approximate).
    tokenizer: Optional[str] = "builtin"
    prompt_format: str = "text"  # text | token_ids
    # completions: POST /v1/completions; chat: POST /v1/chat/completions with the prompt as one user message
    # whose length under the tokenizer's chat template is the requested prompt length.
    endpoint: str = "completions"
    ignore_eos: bool = True
    # A request that does not fit the server's context (prompt + output > the max_model_len its /v1/models
    # reports): clamp (shorten its output to what fits) | drop (leave it out) | send (as it is: the server
    # refuses it or cuts it short). Counted in summary.json (`context`) and the job's row.
    over_context: str = "clamp"
    stream: bool = True
    request_timeout_s: float = 600.0
    # Latencies are measured from the scheduled time (no coordinated omission) or the send time.
    measure_from: str = "scheduled"
    warmup_s: float = 0.0
    cooldown_s: float = 0.0
    # The first N requests of the schedule are sent and saved but left out of every statistic (`measured`
    # column): they meet an idle engine (cold caches, empty queues) and would flatter every engine alike.
    warmup_requests: int = 5
    progress: bool = True
    # Open connections before the run so TCP set-up never lands in a TTFT.
    prewarm_connections: int = 16
    # Sleep until this long before a send, then yield to the event loop until its exact time.
    dispatch_spin_s: float = 0.0015
    max_connections: int = 0  # 0 = unlimited
    # Sent as `Authorization: Bearer <key>` (servers started with an API key; default $SEMIPD_API_KEY).
    api_key: Optional[str] = None


@dataclass
class LoadgenJob:
    loadgen: LoadgenConfig = field(default_factory=LoadgenConfig)
    workload: WorkloadConfig = field(default_factory=WorkloadConfig)
    slo: SLOConfig = field(default_factory=SLOConfig)
    # Top-level shorthands users type (`base_url=...`, `output_dir=...`).
    base_url: Optional[str] = None
    output_dir: Optional[str] = None
    model: Optional[str] = None


@dataclass
class FactorConfig:
    """One factor of an attribution: the overrides of the like-for-like setting and of the paper's."""

    name: str = ""
    label: str = ""
    like: list[str] = field(default_factory=list)  # Hydra overrides (`stack=vllm-0.6`, `workload.num_requests=4000`)
    paper: list[str] = field(default_factory=list)
    engines: list[str] = field(default_factory=list)  # engine presets it applies to; empty: all


@dataclass
class AttributionConfig:
    """`experiment.mode=attribution` (experiments/sweep/attribution.py): the target engine preset's goodput ratio
    to each baseline preset, in every subset of the factors."""

    target: str = "semipd_uncapped"
    baselines: list[str] = field(default_factory=lambda: ["unified"])
    factors: list[FactorConfig] = field(default_factory=list)


@dataclass
class ExperimentConfig:
    name: str = "demo"
    # single: one load run per job | goodput: bisection on the rate between goodput_low and goodput_high |
    # attribution: a goodput ratio attributed to factors (backend=sim; `attribution` below)
    mode: str = "single"
    goodput_low: float = 0.25
    goodput_high: float = 16.0
    goodput_tolerance: float = 0.25
    goodput_seeds: list[int] = field(default_factory=lambda: [0])
    # Multiples of both SLOs at which the figures re-evaluate attainment (slo_attainment_vs_slo_scale).
    slo_scales: list[float] = field(default_factory=lambda: [0.4, 0.6, 0.8, 1.0, 1.2, 1.4, 1.6])
    skip_finished: bool = True  # only jobs whose status is `ok` are skipped; interrupted/incomplete ones re-run
    # Validity: a run is invalid when processes outside the job took more than this fraction of its cores' CPU
    # time during the load (or the hypervisor stole more than max_cpu_steal); see experiments/sweep/host.py.
    max_host_interference: float = 0.1
    max_cpu_steal: float = 0.05
    # Real engines: this many requests, one at a time, before and after each load run measure the engine's
    # step time; a run is flagged when it rose more than max_step_slowdown x during the load or is that much
    # above its calibrated value on this machine (experiments/sweep/probe.py). 0 = no probe.
    step_probe_requests: int = 3
    max_step_slowdown: float = 1.5
    # Cores each job pins itself (and its engine server) to; 0 = every core for a real engine, one for a
    # simulated job. Parallel launchers get disjoint core sets, and a sweep asking for more concurrent jobs
    # than the machine has room for is refused before it starts (experiments/sweep/cores.py).
    cores_per_job: int = 0
    # workload.rate (and the goodput search) per GPU, as the paper plots them: an engine on n GPUs
    # (DistServe 1P1D: 2; tensor parallelism: x TP) is offered n times the rate.
    rates_per_gpu: bool = False
    # A sweep of real jobs whose rates are `workload.load`s: when its estimated wall time (printed before it
    # starts) exceeds this budget, every load point runs fewer requests (workload.num_requests is the most, and
    # never fewer than min_requests) so that it fits; a slow CPU then gets the same regime with wider intervals.
    # Where even min_requests is over budget, the requests get shorter too (workload.length_scale multiplied by
    # 0.75, 0.5, ... down to min_length_scale; the capacity is measured again at those lengths). The budget
    # counts a calibration the sweep has to make. null: always workload.num_requests at the workload's lengths.
    time_budget_s: Optional[float] = None
    min_requests: int = 40
    min_length_scale: float = 0.25
    attribution: AttributionConfig = field(default_factory=AttributionConfig)


@dataclass
class WandbConfig:
    mode: str = "offline"  # offline | online | disabled
    project: str = "semipd-harness"
    entity: Optional[str] = None
    tags: list[str] = field(default_factory=list)
    # One W&B run per job (its requests table, server series and job figures) beside the sweep's summary run.
    # null: per job for real engines, not for simulated jobs (a simulated point costs a fraction of a second; its
    # own run would cost seconds), whose rows reach W&B in the summary run's tables; true / false: always / never.
    per_job_runs: Optional[bool] = None


@dataclass
class RunConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    engine: EngineConfig = field(default_factory=EngineConfig)
    server: ServerConfig = field(default_factory=ServerConfig)
    workload: WorkloadConfig = field(default_factory=WorkloadConfig)
    slo: SLOConfig = field(default_factory=SLOConfig)
    loadgen: LoadgenConfig = field(default_factory=LoadgenConfig)
    experiment: ExperimentConfig = field(default_factory=ExperimentConfig)
    wandb: WandbConfig = field(default_factory=WandbConfig)
    backend: BackendConfig = field(default_factory=BackendConfig)
    hardware: HardwareConfig = field(default_factory=HardwareConfig)
    results_dir: str = "results"
