"""One Hydra job: launch an engine server -> replay the workload -> save -> track.

`run(cfg, job_dir, overrides, sweep)` is what `run.py` calls; it is plain Python
so tests call it too. A job writes into its directory:
  job.json           status (ok | failed), engine, rate, swept overrides, headline metrics
  requests.parquet   one row per request (the load generator's columns)
  summary.json       aggregates, client self-check, SLOs, resolved config
  provenance.json    git commit + dirty flag, packages, machine, resolved config
  server.log, server_requests.jsonl, metrics.prom   the engine server's side
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
import traceback
import urllib.request
from pathlib import Path
from typing import Any, Optional

import pandas as pd
from omegaconf import DictConfig, OmegaConf

from experiments.loadgen import run_loadgen
from experiments.sweep import provenance, simulated, tracking
from experiments.sweep.config import ExperimentConfig, LoadgenConfig, SLOConfig, WandbConfig, WorkloadConfig
from experiments.sweep.launch import OWN_METRICS, AttachedServer, EngineServer, ExternalServer, MetricsRecorder
from experiments.sweep.slo import resolve_slo
from semipd_engine.config import EngineConfig, ModelConfig, ServerConfig, freeze
from semipd_engine.model.presets import PRESETS as MODEL_PRESETS
from semipd_engine.sim.config import BackendConfig, HardwareConfig

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
        if job.external:
            x = job.engine.external
            if job.simulated:
                raise ValueError("engine.name=external runs a real server; backend=sim simulates this project's "
                                 "engines (pick one of them, e.g. engine=unified)")
            if not (x.command or x.url):
                raise ValueError("engine.name=external needs engine.external.command (a command template) or "
                                 "engine.external.url (attach to a running server)")
            if job.slo.scale is not None:
                raise ValueError("slo.scale measures a baseline on this project's engine; give absolute SLOs "
                                 "(slo.ttft_s, slo.tpot_s) for an external engine")
        elif job.simulated:
            simulated.check(job.model, job.engine, job.hardware, job.backend)
        elif not job.model.path and job.model.name not in MODEL_PRESETS:
            raise ValueError(f"model.name={job.model.name!r} is a model shape without weights: run it with backend=sim, "
                             f"or serve a checkpoint with model=hf model.path=DIR")
        elif job.model.tensor_parallel_size != 1:
            raise ValueError("model.tensor_parallel_size > 1 runs on backend=sim (or an external engine); "
                             "this project's real engine runs one device per worker")
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
        e = self.engine
        if self.simulated and self.backend.cost_model == "roofline" and e.name == "disagg":
            return (e.num_prefill_instances + e.num_decode_instances) * self.model.tensor_parallel_size
        return self.model.tensor_parallel_size


def read_job(job_dir: Path) -> Optional[dict[str, Any]]:
    f = Path(job_dir) / "job.json"
    return json.loads(f.read_text()) if f.is_file() else None


def headline(summary: dict[str, Any]) -> dict[str, Any]:
    a = summary["aggregates"]
    out = {"slo_attainment": a["slo_attainment"], "goodput_rps": a["goodput"],
           "request_throughput": a["request_throughput"], "output_token_throughput": a["output_token_throughput"],
           "num_requests": a["num_requests"], "num_errors": a["num_errors"],
           "client_valid": summary["self_check"]["valid"]}
    for m in ("ttft_s", "tpot_s", "itl_s", "e2e_s"):
        for q in ("mean", "p50", "p90", "p99"):
            out[f"{q}_{m}"] = a[m][q]
    return out


def run(cfg: DictConfig, job_dir: str, overrides: Optional[dict[str, str]] = None,
        sweep: Optional[str] = None) -> dict[str, Any]:
    job = Job.from_cfg(cfg)  # validates before anything starts
    jd = Path(job_dir)
    jd.mkdir(parents=True, exist_ok=True)
    prev = read_job(jd)
    if job.experiment.skip_finished and prev and prev.get("status") == "ok":
        log.info("job %s already finished: skipping", jd)
        return prev
    resolved = OmegaConf.to_container(cfg, resolve=True)
    prov = provenance.collect(resolved)
    (jd / "provenance.json").write_text(json.dumps(prov, indent=2, default=str))
    # The label figures group by: the engine preset a sweep named (two semi-PD partitions stay apart).
    label = (overrides or {}).get("engine") or job.engine.name
    load = job.num_gpus if job.experiment.rates_per_gpu else 1
    record: dict[str, Any] = {"status": "running", "engine": label, "rate": job.workload.rate,
                              "num_gpus": job.num_gpus, "rate_per_gpu": job.experiment.rates_per_gpu,
                              "workload": job.workload.name, "model": job.model.path or job.model.name,
                              "mode": job.experiment.mode, "backend": job.backend.name,
                              "overrides": overrides or {}, "started": time.time()}
    if job.simulated:
        record["hardware"] = job.hardware.name if job.backend.cost_model == "roofline" else "cpu"
    (jd / "job.json").write_text(json.dumps(record, indent=2))
    summary: dict[str, Any] = {}
    try:
        slo = _resolve_slo(job, prov["machine"])
        slo_cfg = dataclasses.replace(job.slo, ttft_s=slo["ttft_s"], tpot_s=slo["tpot_s"])
        record["slo"] = slo
        # The engine sees the job's SLOs (semipd_dynamic steers on them) and logs its decisions here.
        engine_cfg = dataclasses.replace(job.engine, slo_ttft_s=slo["ttft_s"], slo_tpot_s=slo["tpot_s"],
                                         slo_percentile=job.slo.percentile,
                                         decision_log=str(jd / "partition_log.jsonl")
                                         if job.engine.name == "semipd_dynamic" else None)
        if job.simulated:
            def measure(wcfg, out_dir):
                return simulated.run_simulated(job.model, engine_cfg, job.hardware, job.backend, job.loadgen,
                                               dataclasses.replace(wcfg, rate=wcfg.rate * load), slo_cfg, out_dir,
                                               resolved)

            summary = _measure(job, measure, slo_cfg, jd, record)
        else:
            with _server(job, engine_cfg, jd) as srv:
                lcfg = dataclasses.replace(job.loadgen, base_url=srv.url)

                def measure(wcfg, out_dir):
                    return run_loadgen(lcfg, dataclasses.replace(wcfg, rate=wcfg.rate * load), slo_cfg, out_dir,
                                       resolved)

                x = job.engine.external
                names = dict(x.metrics) if job.external else OWN_METRICS
                with MetricsRecorder(srv.url, names, x.metrics_interval_s) as recorder:
                    summary = _measure(job, measure, slo_cfg, jd, record)
                recorder.save(jd / "server_metrics.parquet")
                _save_server_metrics(srv.url, jd)
        record.update(status="ok", **headline(summary))
    except BaseException as e:
        record.update(status="failed", error=f"{type(e).__name__}: {e}", traceback=traceback.format_exc())
        raise
    finally:
        record["finished"] = time.time()
        (jd / "job.json").write_text(json.dumps(record, indent=2, default=str))
    requests = pd.read_parquet(jd / "requests.parquet") if (jd / "requests.parquet").is_file() else None
    try:
        tracking.log_job(job.wandb, str(jd), name=jd.name, group=sweep or jd.parent.name, job_type=job.engine.name,
                         config=resolved, summary={**record, "aggregates": summary.get("aggregates", {})},
                         requests=requests)
    except Exception as e:  # tracking must never lose a finished measurement
        log.warning("W&B logging failed: %s", e)
    return record


def _server(job: Job, engine_cfg, jd: Path):
    """This project's server, an external engine launched from its command template, or one attached to."""
    if not job.external:
        return EngineServer(job.model, engine_cfg, job.server, str(jd), job.server.startup_timeout_s)
    if job.engine.external.url:
        return AttachedServer(engine_cfg, str(jd))
    return ExternalServer(job.model, engine_cfg, str(jd))


def _measure(job: Job, measure, slo_cfg, jd: Path, record: dict[str, Any]) -> dict[str, Any]:
    if job.experiment.mode == "goodput":
        summary = goodput_search(measure, job.workload, slo_cfg, job.experiment, jd)
        record["goodput_rate"] = summary["goodput_rate"]
        return summary
    return measure(job.workload, str(jd))


def _resolve_slo(job: Job, machine: dict) -> dict[str, Any]:
    if not job.simulated or job.slo.scale is None:
        return resolve_slo(job.slo, job.model, job.engine, job.server, job.workload, job.loadgen, machine)
    # Simulated: the single-request baseline is simulated too, with the unified engine (as a real one is measured).
    w = job.workload
    unified = dataclasses.replace(job.engine, name="unified", policy="prefill_priority")
    base = simulated.single_request_latency(job.model, unified, job.hardware, job.backend,
                                            max(1, round(w.prompt_mean * w.length_scale)),
                                            max(2, round(w.output_mean * w.length_scale)))
    return {"ttft_s": job.slo.scale * base["ttft_s"], "tpot_s": job.slo.scale * base["tpot_s"],
            "scale": job.slo.scale, "baseline_ttft_s": base["ttft_s"], "baseline_tpot_s": base["tpot_s"]}


def _save_server_metrics(url: str, jd: Path) -> None:
    try:
        with urllib.request.urlopen(url + "/metrics", timeout=10) as r:
            (jd / "metrics.prom").write_bytes(r.read())
    except OSError as e:
        log.warning("could not read the server's /metrics: %s", e)


def goodput_search(measure, wcfg, slo_cfg, exp, jd: Path) -> dict[str, Any]:
    """DistServe protocol: bisect the rate for the highest one with attainment >= target.

    `measure(workload_cfg, out_dir) -> summary` runs one probe (a real load run, or a simulated one).
    """
    target = slo_cfg.target_attainment
    probes: list[dict[str, Any]] = []
    aggregates: dict[float, dict[str, Any]] = {}  # rate -> aggregates of its first seed
    frames = []

    def attainment(rate: float) -> float:
        vals = []
        for seed in exp.goodput_seeds:
            d = jd / "probes" / f"rate{rate:.4f}_seed{seed}"
            s = measure(dataclasses.replace(wcfg, rate=rate, seed=seed), str(d))
            vals.append(s["aggregates"]["slo_attainment"])
            aggregates.setdefault(rate, s["aggregates"])
            probes.append({"rate": rate, "seed": seed, **headline(s)})
            df = pd.read_parquet(d / "requests.parquet")
            frames.append(df.assign(probe_rate=rate, probe_seed=seed))
        return sum(vals) / len(vals)

    lo, hi = exp.goodput_low, exp.goodput_high
    if attainment(lo) < target:
        goodput = 0.0
    elif attainment(hi) >= target:
        goodput = hi
    else:
        while hi - lo > exp.goodput_tolerance:
            mid = (lo + hi) / 2
            if attainment(mid) >= target:
                lo = mid
            else:
                hi = mid
        goodput = lo
    pd.concat(frames, ignore_index=True).to_parquet(jd / "requests.parquet", index=False)
    best = max((p for p in probes if p["rate"] <= goodput), key=lambda p: p["rate"], default=probes[0])
    summary = {"goodput_rate": goodput, "probes": probes, "target_attainment": target,
               "aggregates": aggregates[best["rate"]],
               "self_check": {"valid": all(p["client_valid"] for p in probes)}}
    (jd / "summary.json").write_text(json.dumps(summary, indent=2, default=str))
    return summary
