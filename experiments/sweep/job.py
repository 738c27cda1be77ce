"""One Hydra job: launch an engine server -> replay the workload -> save -> track.

`run(cfg, job_dir, overrides, sweep)` is what `run.py` calls; it is plain Python
so tests call it too. A job writes into its directory:
  job.json           status (ok | failed | interrupted | incomplete), validity, engine, rate, swept overrides,
                     headline metrics with their 95% intervals (`*_ci_low`, `*_ci_high`)
  requests.parquet   one row per request (the load generator's columns; `measured` marks the ones counted)
  summary.json       aggregates (with intervals), client self-check, host check, validity, SLOs, resolved config
  provenance.json    git commit + dirty flag, packages, machine, resolved config
  server.log, server_requests.jsonl, metrics.prom   the engine server's side
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import signal
import threading
import time
import traceback
import urllib.request
from pathlib import Path
from typing import Any, Optional

import pandas as pd
from omegaconf import DictConfig, OmegaConf

from experiments.analysis.request_metrics import check_tpot_definition
from experiments.loadgen import run_loadgen
from experiments.loadgen.client import LoadgenError, check_config
from experiments.loadgen.result import GoodputSearch, RunResult, Validity
from experiments.loadgen.rows import join_rows
from experiments.loadgen.workloads import check_multi_turn
from experiments.sweep import capacity, cores, exchange, probe, provenance, simulated, tracking
from experiments.sweep.config import ExperimentConfig, LoadgenConfig, SLOConfig, WandbConfig, WorkloadConfig
from experiments.sweep.host import HostMonitor
from experiments.sweep.launch import OWN_METRICS, AttachedServer, EngineServer, ExternalServer, MetricsRecorder
from experiments.sweep.slo import apply_scales, resolve_slo
from experiments.sweep.slo import relative as slo_relative
from semipd_engine.config import EngineConfig, ModelConfig, ServerConfig, freeze
from semipd_engine.model import dtype as dtypes
from semipd_engine.model.presets import PRESETS as MODEL_PRESETS
from semipd_engine.sim.config import BackendConfig, HardwareConfig
from semipd_engine.topology.engines import build_topology, check_engine_config, engine_kind, retarget
from semipd_engine.topology.graph import CONTROLLER_KEYS

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class Job:
    model: Any
    engine: Any
    server: Any
    workload: Any
    slo: Any
    loadgen: Any
    experiment: Any
    wandb: Any
    backend: Any
    hardware: Any

    @classmethod
    def from_cfg(cls, cfg: DictConfig) -> Job:
        job = cls(freeze(ModelConfig, cfg.model), freeze(EngineConfig, cfg.engine), freeze(ServerConfig, cfg.server),
                  freeze(WorkloadConfig, cfg.workload), freeze(SLOConfig, cfg.slo),
                  freeze(LoadgenConfig, cfg.loadgen), freeze(ExperimentConfig, cfg.experiment),
                  freeze(WandbConfig, cfg.wandb), freeze(BackendConfig, cfg.backend),
                  freeze(HardwareConfig, cfg.hardware))
        if job.backend.name not in ("real", "sim"):
            raise ValueError(f"backend.name must be 'real' or 'sim', got {job.backend.name!r}")
        if job.experiment.mode not in ("single", "goodput", "attribution"):
            raise ValueError(f"experiment.mode must be single, goodput or attribution, got {job.experiment.mode!r}")
        if job.experiment.mode == "attribution" and not job.simulated:
            raise ValueError("experiment.mode=attribution searches thousands of rates: it runs on backend=sim")
        check_engine_config(job.engine)  # a key this engine would ignore fails here, naming it
        check_tpot_definition(job.slo.tpot_definition)
        try:  # the load generator's settings too, before any server starts (the simulator times every token)
            real = not job.simulated
            check_config(job.loadgen, None, job.slo if real else None, job.workload if real else None)
        except LoadgenError as e:
            raise ValueError(str(e)) from None
        if job.workload.multi_turn:
            check_multi_turn(job.workload)
        if job.external:
            x = job.engine.external
            if job.simulated:
                raise ValueError("engine.name=external runs a real server; backend=sim simulates this project's "
                                 "engines (pick one of them, e.g. engine=unified)")
            if not (x.command or x.url):
                raise ValueError("engine.name=external needs engine.external.command (a command template) or "
                                 "engine.external.url (attach to a running server)")
            # Relative SLOs are multiples of one request's latency on this project's unified engine, the one
            # reference for every engine of a sweep: it has to be able to load the model.
            loadable = (job.model.path and os.path.isdir(job.model.path)) or (
                not job.model.path and job.model.name in MODEL_PRESETS)
            if slo_relative(job.slo) and not loadable:
                raise ValueError("slo.scale (slo.ttft_scale, slo.tpot_scale) multiplies one request's latency "
                                 "measured on this project's unified engine, which needs the model as a local "
                                 "checkpoint (model=hf model.path=DIR); give absolute SLOs (slo.ttft_s, slo.tpot_s) "
                                 "for an external engine serving anything else")
        elif job.simulated:
            simulated.check(job.model, job.engine, job.hardware, job.backend)
        elif not job.model.path and job.model.name not in MODEL_PRESETS:
            raise ValueError(f"model.name={job.model.name!r} is a model shape without weights: run it with backend=sim, "
                             f"or serve a checkpoint with model=hf model.path=DIR")
        elif job.model.tensor_parallel_size != 1:
            raise ValueError("model.tensor_parallel_size > 1 runs on backend=sim (or an external engine); "
                             "this project's real engine runs one device per worker")
        elif job.engine.prefill_tp > 1 or job.engine.decode_tp > 1:
            raise ValueError("engine.prefill_tp / engine.decode_tp > 1 run on backend=sim; this project's real "
                             "engine runs one device per worker")
        if job.workload.load is not None:
            if job.simulated or job.external:
                raise ValueError("workload.load is a fraction of this machine's measured capacity for this project's "
                                 "real engine; with " + ("backend=sim" if job.simulated else "an external engine")
                                 + " give workload.rate (req/s) and set workload.load=null")
            if not job.workload.load > 0:
                raise ValueError(f"workload.load must be > 0 (a fraction of the capacity), got {job.workload.load}")
        if not 0 < job.experiment.min_length_scale <= 1:
            raise ValueError(f"experiment.min_length_scale must be in (0, 1] (the shortest requests a time budget "
                             f"may ask for, as a multiple of the workload's lengths), got "
                             f"{job.experiment.min_length_scale}")
        task = OmegaConf.select(cfg, "hydra.overrides.task", default=None) if "hydra" in cfg else None
        if task is not None:
            check_overrides(job, [o.lstrip("+~").partition("=")[0] for o in task])
        return job

    @property
    def simulated(self) -> bool:
        return self.backend.name == "sim"

    @property
    def external(self) -> bool:
        return self.engine.name == "external"

    @property
    def num_gpus(self) -> int:
        """GPUs the engine occupies: a TP group per instance, and DistServe's instances each on their own."""
        if self.simulated and self.backend.cost_model == "roofline":
            return sum(build_topology(self.engine).unit_tp(self.engine, self.model.tensor_parallel_size))
        return self.model.tensor_parallel_size


def check_overrides(job: Job, keys) -> None:
    """A rate given on the command line while `workload.load` is in force would be silently replaced: refuse."""
    if job.workload.load is not None and "workload.rate" in set(keys):
        raise ValueError(f"workload.rate and workload.load={job.workload.load} are both set: the load (a fraction of "
                         f"the measured capacity) decides the rate. Give workload.load=... alone, or rates in req/s "
                         f"with workload.load=null (e.g. `python run.py workload.load=null workload.rate=2,4,6`)")


def resolve_machine(job: Job, machine: dict, sweep_dir: Optional[str] = None) -> tuple[Job, dict[str, Any]]:
    """The job with what depends on this machine made concrete: `model.dtype=auto` (measured), and the rate of a
    `workload.load` (a fraction of the unified engine's measured capacity). Returns what was decided."""
    decided: dict[str, Any] = {}
    if job.simulated:
        return job, decided
    model, choice = dtypes.resolve(job.model)
    decided["dtype"] = choice
    if job.external:
        # The engine keeps `model.dtype` as given (`auto`: its own choice, on whatever device it runs on: a GPU
        # behind a command must not get this CPU's answer). The SLO baseline, this project's unified engine on
        # this machine, is measured in this machine's choice, as for the built-in engines of the same sweep: one
        # baseline, one pair of SLOs for every engine.
        decided["baseline_model"] = model
        return job, decided
    job = dataclasses.replace(job, model=model)
    if job.workload.load is not None:
        # The sweep was sized to its time budget before it started (plan.announce): fewer and maybe shorter
        # requests per load point, the capacity measured at those lengths.
        sizing = capacity.sweep_sizing(sweep_dir) if job.experiment.time_budget_s else None
        w = job.workload
        if sizing and sizing.get("length_scale", 1.0) != 1.0:
            w = dataclasses.replace(w, length_scale=w.length_scale * sizing["length_scale"])
            decided["sized_length_scale"] = sizing["length_scale"]
        cal = capacity.resolve(job.model, job.engine, job.server, w, job.loadgen, machine, sweep_dir)
        decided["capacity"] = cal
        n = w.num_requests
        if sizing:
            n = min(n, int(sizing["num_requests"]))
            decided["sized_num_requests"] = n
        job = dataclasses.replace(job, workload=dataclasses.replace(
            w, rate=round(capacity.rate_for(w.load, cal), 4), num_requests=n))
    return job, decided


def read_job(job_dir: Path) -> Optional[dict[str, Any]]:
    f = Path(job_dir) / "job.json"
    return json.loads(f.read_text()) if f.is_file() else None


class JobInterrupted(BaseException):
    """SIGTERM or SIGINT during a job. The job is recorded as `interrupted` (never `ok`, so the next run of the
    sweep runs it again), its server is stopped, and the exception ends the sweep: it derives from
    BaseException so that Hydra's launchers do not treat it as one failed job and carry on with the next."""


@contextlib.contextmanager
def _signals_interrupt():
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum, frame):
        raise JobInterrupted(signal.Signals(signum).name)

    previous = {s: signal.signal(s, handler) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield
    finally:
        for s, h in previous.items():
            signal.signal(s, h)


def run(cfg: DictConfig, job_dir: str, overrides: Optional[dict[str, str]] = None,
        sweep_dir: Optional[str] = None) -> dict[str, Any]:
    """One job in `job_dir`; `sweep_dir`: the multirun's directory (None: the job is a sweep of its own)."""
    job = Job.from_cfg(cfg)  # validates before anything starts
    check_overrides(job, (overrides or {}).keys())
    jd = Path(job_dir)
    jd.mkdir(parents=True, exist_ok=True)
    prev = read_job(jd)
    # Only a whole, valid measurement is kept: interrupted, incomplete, failed and invalid jobs run again.
    if job.experiment.skip_finished and prev and prev.get("status") == "ok" and prev.get("valid", True):
        log.info("job %s already finished: skipping", jd)
        return prev
    resolved = OmegaConf.to_container(cfg, resolve=True)
    prov = provenance.collect(resolved)
    job, decided = resolve_machine(job, prov["machine"], sweep_dir)
    if "dtype" in decided:  # with the two matmul figures behind it, like the host check's figures
        prov["dtype_choice"] = decided["dtype"].as_dict()
        log.info("%s", dtypes.describe(decided["dtype"]))
    if "capacity" in decided:
        prov["capacity"] = decided["capacity"]
    (jd / "provenance.json").write_text(json.dumps(prov, indent=2, default=str))
    # The label figures group by: the engine preset a sweep named (two semi-PD partitions stay apart).
    label = (overrides or {}).get("engine") or job.engine.name
    record: dict[str, Any] = {"status": "running", "engine": label, "rate": job.workload.rate,
                              "num_gpus": job.num_gpus, "rate_per_gpu": job.experiment.rates_per_gpu,
                              "workload": job.workload.name, "model": job.model.path or job.model.name,
                              "mode": job.experiment.mode, "backend": job.backend.name,
                              "seed": job.workload.seed, "dtype": job.model.dtype, "overrides": overrides or {},
                              # the lengths' multiple as run (a time budget may have shortened the requests)
                              "length_scale": job.workload.length_scale,
                              "started": time.time()}
    if "dtype" in decided:
        record["dtype_reason"] = decided["dtype"].reason
    if "capacity" in decided:  # the rate is load x the unified engine's measured capacity on this machine
        record.update(load=job.workload.load, capacity_rps=decided["capacity"]["capacity_rps"])
    if job.simulated:
        record["hardware"] = job.hardware.name if job.backend.cost_model == "roofline" else "cpu"
        record["stack"] = simulated.stack_name(job.engine, job.backend)
    (jd / "job.json").write_text(json.dumps(record, indent=2))
    if job.experiment.mode == "attribution":
        return _attribute(job, jd, record, overrides or {})
    result: Optional[RunResult] = None
    per_job = cores.cores_needed(job.backend.name, job.experiment.cores_per_job)
    with _recording(record, jd):
        with _signals_interrupt(), cores.core_slot(per_job) as my_cores:
            record["cores"] = my_cores
            # A sweep's simulated jobs that differ only in their SLOs share one simulation (tight and loose halves).
            sim_cache = Path(sweep_dir) / "sim_cache" if sweep_dir and job.simulated else None
            result = _run_measurement(job, jd, record, prov, resolved, my_cores, decided.get("baseline_model"),
                                      sim_cache)
        record.update(status=result.status, **result.row(), **result.validity_columns())
        if record["status"] == "interrupted":
            raise JobInterrupted(result.signal or "requests cancelled")
    if not tracking.logs_job(job.wandb, job.simulated):
        return record
    requests = pd.read_parquet(jd / "requests.parquet") if (jd / "requests.parquet").is_file() else None
    # Every run of a sweep under <sweep dir>/wandb/, so that one `wandb sync` glob finds them all.
    home = Path(sweep_dir) if sweep_dir else jd
    try:
        tracking.log_job(job.wandb, str(jd), str(home), name=jd.name, group=job.experiment.name,
                         sweep_id=home.name, job_type=label, config=resolved,
                         summary={**record, "aggregates": result.aggregates.to_dict()}, requests=requests)
    except Exception as e:  # tracking must never lose a finished measurement
        log.warning("W&B logging failed: %s", e)
    return record


@contextlib.contextmanager
def _recording(record: dict[str, Any], jd: Path):
    """The job's record is written however the job ends: finished, failed (with its traceback) or interrupted."""
    try:
        yield
    except JobInterrupted as e:
        record.update(status="interrupted", valid=False, error=f"interrupted: {e}")
        log.error("job %s interrupted (%s): recorded as `interrupted`; running the sweep again runs it again", jd, e)
        raise
    except BaseException as e:
        record.update(status="failed", error=f"{type(e).__name__}: {e}", traceback=traceback.format_exc())
        raise
    finally:
        record["finished"] = time.time()
        (jd / "job.json").write_text(json.dumps(record, indent=2, default=str))


def _attribute(job: Job, jd: Path, record: dict[str, Any], overrides: dict[str, str]) -> dict[str, Any]:
    """`experiment.mode=attribution`: one job searches every setting's goodputs (experiments/sweep/attribution.py)."""
    from experiments.sweep import attribution

    with _recording(record, jd):
        record.update(status="ok", attribution=attribution.run(job, jd, overrides, Job.from_cfg))
    return record


def _run_measurement(job: Job, jd: Path, record: dict[str, Any], prov: dict, resolved: Any,
                     my_cores: list[int], baseline_model=None, sim_cache: Optional[Path] = None) -> RunResult:
    slo = _resolve_slo(job, prov["machine"], baseline_model)
    slo_cfg = dataclasses.replace(job.slo, ttft_s=slo["ttft_s"], tpot_s=slo["tpot_s"])
    record["slo"] = {**slo, "tpot_definition": job.slo.tpot_definition}
    load = job.num_gpus if job.experiment.rates_per_gpu else 1
    (jd / "partition_log.jsonl").unlink(missing_ok=True)  # the engine appends: a re-run starts a fresh log
    # An engine steered by the SLOs (a topology with a controller) sees the job's, and logs its decisions here.
    engine_cfg = job.engine
    if CONTROLLER_KEYS <= engine_kind(job.engine.name).keys:
        engine_cfg = dataclasses.replace(job.engine, slo_ttft_s=slo["ttft_s"], slo_tpot_s=slo["tpot_s"],
                                         slo_percentile=job.slo.percentile,
                                         decision_log=str(jd / "partition_log.jsonl"))
    if job.simulated:
        measure = SimulatedProbe(job.model, engine_cfg, job.hardware, job.backend, job.loadgen, load, slo_cfg,
                                 resolved, sim_cache)
        return _measure(job, measure, slo_cfg, jd, record)
    srv = server_for(job, engine_cfg, jd)
    with contextlib.ExitStack() as stack:
        # Stopped even when a signal lands while it starts (a `with` alone would not: __enter__ never returned).
        stack.callback(srv.stop)
        stack.enter_context(srv)
        lcfg = dataclasses.replace(job.loadgen, base_url=srv.url)
        record["server_ready_monotonic"] = time.monotonic()
        # An attached server on this machine runs outside the job's process tree: its CPU is the job's own.
        attached = (srv.pid,) if isinstance(srv, AttachedServer) and srv.pid else ()
        if isinstance(srv, AttachedServer) and not srv.pid:
            log.info("attached server %s: not a process of this machine that can be seen; its CPU time, if it "
                     "runs here, counts as host interference", srv.url)

        n_probe = job.experiment.step_probe_requests

        def step_probe(wcfg):
            p = probe.measure(srv.url, lcfg, wcfg, n_probe)
            if p and p.get("interrupted"):
                raise JobInterrupted("signal during the step probe")
            return p

        def measure(wcfg, out_dir):
            before = step_probe(wcfg) if n_probe else None
            with HostMonitor(cores=set(my_cores), max_interference=job.experiment.max_host_interference,
                             max_steal=job.experiment.max_cpu_steal, also=attached) as mon:
                r = run_loadgen(lcfg, dataclasses.replace(wcfg, rate=wcfg.rate * load), slo_cfg, out_dir, resolved)
            host = {**mon.result(), "dtype_choice": prov.get("dtype_choice")}  # what the model ran in, and why
            v = None
            if n_probe and not r.interrupted:
                after = step_probe(wcfg)
                key = probe.calibration_key(job, my_cores, prov["machine"])
                v = probe.verdict(before, after, probe.load_calibration(key), job.experiment.max_step_slowdown,
                                  host.get("valid", True), _partition_moved(jd))
                if v.pop("save"):
                    probe.save_calibration(key, before)
            return _finish(r, out_dir, host=host, step_probe=v)

        x = job.engine.external
        names = dict(x.metrics) if job.external else OWN_METRICS
        with MetricsRecorder(srv.url, names, x.metrics_interval_s) as recorder:
            result = _measure(job, measure, slo_cfg, jd, record)
        recorder.save(jd / "server_metrics.parquet")
        _save_server_metrics(srv.url, jd)
        return result


def server_for(job: Job, engine_cfg, jd: Path):
    """This project's server, an external engine launched from its command template, or one attached to."""
    if not job.external:
        return EngineServer(job.model, engine_cfg, job.server, str(jd), job.server.startup_timeout_s)
    if job.engine.external.url:
        return AttachedServer(engine_cfg, str(jd), job.model)
    return ExternalServer(job.model, engine_cfg, str(jd))


@dataclasses.dataclass(frozen=True)
class SimulatedProbe:
    """`measure(workload_cfg, out_dir)` of a simulated job: one simulated run, judged and written. A value (it
    pickles), so that another worker of a pooled sweep can run it (exchange.py)."""

    model: ModelConfig
    engine: EngineConfig
    hardware: HardwareConfig
    backend: BackendConfig
    loadgen: LoadgenConfig
    load: int  # GPUs the rate is per
    slo: SLOConfig
    resolved: Any
    sim_cache: Optional[Path]

    def __call__(self, wcfg: WorkloadConfig, out_dir: Optional[str]) -> RunResult:
        r = simulated.run_simulated(self.model, self.engine, self.hardware, self.backend, self.loadgen,
                                    dataclasses.replace(wcfg, rate=wcfg.rate * self.load), self.slo, out_dir,
                                    self.resolved, cache_dir=self.sim_cache)
        # A virtual clock: nothing on the host can disturb it.
        return _finish(r, out_dir, host={"checked": False, "valid": True, "reasons": [],
                                         "note": "simulated: virtual clock"})


def _finish(r: RunResult, out_dir: Optional[str], **checks) -> RunResult:
    """The run with what was checked around it, judged, and written: a signal mid-run stops the job here."""
    if r.completeness is None and out_dir and (Path(out_dir) / "requests.parquet").is_file():
        from experiments.loadgen.client import completeness

        checks["completeness"] = completeness(_error_column(Path(out_dir) / "requests.parquet"),
                                              r.workload.num_requests)
    r = r.with_checks(**checks)
    if out_dir:
        r.write(out_dir)
    if r.interrupted:
        raise JobInterrupted(r.signal or "requests cancelled")
    return r


def _error_column(path: Path) -> pd.DataFrame:
    """A rows file's `error` column (all `completeness` reads; the per-token lists are most of the file)."""
    import pyarrow.parquet as pq

    f = pq.ParquetFile(path)
    if "error" in f.schema_arrow.names:
        return f.read(columns=["error"]).to_pandas()
    return pd.DataFrame(index=range(f.metadata.num_rows))


def _measure(job: Job, measure, slo_cfg, jd: Path, record: dict[str, Any]) -> RunResult:
    if job.experiment.mode == "goodput":
        r = goodput_search(measure, job.workload, slo_cfg, job.experiment, jd)
        record.update({k: getattr(r.goodput, k) for k in ("goodput_rate", "goodput_at_range_top",
                                                          "goodput_at_range_bottom", "goodput_monotone")})
        return r
    return measure(job.workload, str(jd))


def _resolve_slo(job: Job, machine: dict, baseline_model=None) -> dict[str, Any]:
    if not job.simulated or not slo_relative(job.slo):
        return resolve_slo(job.slo, baseline_model or job.model, job.engine, job.server, job.workload, job.loadgen,
                           machine)
    # Simulated: the single-request baseline is simulated too, with the unified engine (as a real one is measured).
    w = job.workload
    unified = retarget(job.engine, "unified", policy="prefill_priority")
    base = simulated.single_request_latency(job.model, unified, job.hardware, job.backend,
                                            max(1, round(w.prompt_mean * w.length_scale)),
                                            max(2, round(w.output_mean * w.length_scale)))
    return apply_scales(job.slo, base)


def _partition_moved(jd: Path) -> bool:
    """Did the job's controller end on another partition than it started with (its partition_log.jsonl)?"""
    path = jd / "partition_log.jsonl"
    if not path.is_file():
        return False
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    shares = {(r.get("prefill_share"), r.get("decode_share")) for r in rows}
    return len(shares) > 1


def _save_server_metrics(url: str, jd: Path) -> None:
    try:
        with urllib.request.urlopen(url + "/metrics", timeout=10) as r:
            (jd / "metrics.prom").write_bytes(r.read())
    except OSError as e:
        log.warning("could not read the server's /metrics: %s", e)


def goodput_search(measure, wcfg, slo_cfg, exp, jd: Path) -> RunResult:
    """DistServe protocol: bisect the rate for the highest one with attainment >= target.

    `measure(workload_cfg, out_dir) -> RunResult` runs one probe (a real load run, or a simulated one).
    The result says how far to trust it: `goodput_at_range_top` (even goodput_high passed: the true goodput is
    at least that), `goodput_at_range_bottom` (even goodput_low failed), `goodput_monotone` (no probed rate
    failed below one that passed; a bisection assumes it), and every probe's validity.
    """
    target = slo_cfg.target_attainment
    probes: list[dict[str, Any]] = []
    first: dict[float, RunResult] = {}  # rate -> the result of its first seed
    files: list[tuple[Path, dict[str, Any]]] = []  # each probe's rows, with its rate and seed
    reasons: list[str] = []

    ex = exchange.current() if isinstance(measure, SimulatedProbe) else None

    def passes(rate: float) -> bool:
        """Mean attainment over the seeds meets the target. A rate some seed did not manage to offer (a
        multi-turn run too short for its conversations: request_metrics.steady_state) is not certified."""
        vals, offered = [], True
        dirs = [Path(jd).absolute() / "probes" / f"rate{rate:.4f}_seed{seed}" for seed in exp.goodput_seeds]
        calls = [(dataclasses.replace(wcfg, rate=rate, seed=seed), str(d)) for seed, d in zip(exp.goodput_seeds, dirs)]
        # A pooled sweep's idle workers may run some of them (exchange.py); else one after another, here.
        results = ex.map(measure, calls) if ex is not None else [measure(*c) for c in calls]
        for seed, d, r in zip(exp.goodput_seeds, dirs, results):
            vals.append(r.aggregates.slo_attainment)
            offered &= (r.aggregates.steady_state or {}).get("offered_rate_reached") is not False
            first.setdefault(rate, r)
            v = r.validity or r.checked()
            probes.append({"rate": rate, "seed": seed, **r.row(), "valid": v.valid})
            reasons.extend(f"probe {rate:g} req/s seed {seed}: {x}" for x in v.reasons)
            files.append((d / "requests.parquet", {"probe_rate": float(rate), "probe_seed": int(seed)}))
        return offered and sum(vals) / len(vals) >= target

    lo, hi = exp.goodput_low, exp.goodput_high
    at_top = at_bottom = False
    if not passes(lo):
        goodput, at_bottom = 0.0, True
    elif passes(hi):
        goodput, at_top = hi, True
    else:
        while hi - lo > exp.goodput_tolerance:
            mid = (lo + hi) / 2
            if passes(mid):
                lo = mid
            else:
                hi = mid
        goodput = lo
    # Joined as a sweep joins its jobs' (their encoded row groups copied: a search's 20 probes' per-token lists
    # through pandas took seconds, through Arrow ~1 s).
    join_rows(files, jd / "requests.parquet")
    best = max((p for p in probes if p["rate"] <= goodput), key=lambda p: p["rate"], default=probes[0])
    by_rate = pd.DataFrame(probes).groupby("rate")["slo_attainment"].mean()
    search = GoodputSearch(goodput_rate=goodput, target_attainment=target, goodput_at_range_top=at_top,
                           goodput_at_range_bottom=at_bottom, goodput_monotone=curve_is_monotone(
                               by_rate.index.to_numpy(), by_rate.to_numpy(), target), probes=tuple(probes))
    # The reported probe's result (its statistics, workload and SLOs), judged by every probe of the search.
    result = dataclasses.replace(first[best["rate"]], goodput=search, host=None, step_probe=None, completeness=None,
                                 self_check={"valid": all(p["client_valid"] for p in probes)},
                                 validity=Validity(not reasons, tuple(reasons)))
    result.write(jd)
    return result


def curve_is_monotone(rates, attainments, target: float) -> bool:
    """No tested rate fails the target below a tested rate that passes it."""
    passed = [a >= target for _, a in sorted(zip(rates, attainments))]
    return all(not (not p and any(passed[i + 1:])) for i, p in enumerate(passed))
