"""What a sweep will do, said before it starts: every job's engine config checked, the machine's dtype and
capacity decided, each load turned into a rate, the wall time estimated (and the request count fitted to
`experiment.time_budget_s`)."""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path
from typing import Optional

from experiments.sweep import capacity
from experiments.sweep.compose import composed
from experiments.sweep.job import Job, check_overrides
from experiments.sweep.slo import relative
from semipd_engine import cache
from semipd_engine.config import EngineConfig, freeze
from semipd_engine.topology.engines import check_engine_config


def check_jobs(config) -> int:
    """Compose every job of the sweep and check its engine config: a key its engine does not read fails the
    sweep here, naming the key, the engine and the job, before any calibration or job starts. Returns the number
    of jobs (0 outside a Hydra run)."""
    from hydra.core.global_hydra import GlobalHydra

    if not GlobalHydra.instance().is_initialized():
        return 0
    loader = GlobalHydra.instance().config_loader()
    jobs = capacity.sweep_overrides(config)
    for overrides in jobs:
        cfg = composed(loader, config, overrides)
        try:
            check_engine_config(freeze(EngineConfig, cfg.engine))
        except ValueError as e:
            raise ValueError(f"job {' '.join(overrides)}: {e}") from None
    return len(jobs)


def _value(v: Optional[str], default):
    if v is None:
        return default
    return None if v in ("null", "None", "~") else float(v)


def _plan(real: list[dict], loads: list, cal: dict, w) -> list[dict]:
    """Each real job's rate and request count: a load becomes a rate at this calibration's capacity."""
    return [{"rate": capacity.rate_for(load, cal) if load is not None else _value(j.get("workload.rate"), w.rate),
             "load": load, "num_requests": int(_value(j.get("workload.num_requests"), w.num_requests)),
             "relative": load is not None} for j, load in zip(real, loads)]


def _cut(planned: list[dict], n: int) -> list[dict]:
    return [{**p, "num_requests": min(p["num_requests"], n)} if p["relative"] else p for p in planned]


def announce(config, sweep_dir: Optional[str] = None) -> Optional[float]:
    """Before a sweep of real jobs: calibrate (if a job asks for a `workload.load`), print the rates each load
    becomes and the estimated wall time. Returns the estimate in seconds (None when it cannot be made)."""
    from experiments.sweep.provenance import machine as this_machine
    from semipd_engine.model import dtype as dtypes

    jobs = capacity.sweep_jobs(config)
    real = [j for j in jobs if j.get("backend", config.backend.name) == "real"
            and j.get("engine", config.engine.name) not in ("vllm", "vllm_chunked", "sglang", "semipd_fork",
                                                             "command", "attach", "external")]
    if not real or config.engine.name == "external":
        return None
    group_keys = {k for j in real for k in j if k.startswith(("model", "workload.", "workload"))
                  and k not in ("workload.rate", "workload.load", "workload.num_requests", "workload.seed")}
    base = Job.from_cfg(config)
    w = base.workload
    loads = [_value(j.get("workload.load"), w.load) for j in real]
    for j, load in zip(real, loads):
        check_overrides(dataclasses.replace(base, workload=dataclasses.replace(w, load=load)), j.keys())
    model, choice = dtypes.resolve(base.model)
    print(dtypes.describe(choice), flush=True)
    m = this_machine()
    t0 = time.monotonic()  # a calibration made now is part of the budget
    probes, budget, floor = base.experiment.step_probe_requests, base.experiment.time_budget_s, base.experiment.min_requests
    worth = None
    if budget and any(x is not None for x in loads):
        def worth(single: dict) -> bool:
            """Is the saturated calibration run worth making at these lengths? Not when even the highest capacity
            these single-request latencies allow leaves the sweep over budget at the request floor: the requests
            will be shortened, and measured there."""
            c = {**single, "capacity_rps": capacity.CAPACITY_X_E2E[1] / single["single_e2e_s"]}
            return capacity.estimate(_cut(_plan(real, loads, c, w), floor), c, probes) <= budget - (time.monotonic() - t0)
    if any(x is not None for x in loads):
        cal = capacity.resolve(model, base.engine, base.server, w, base.loadgen, m, sweep_dir, worth=worth)
    else:
        cal = capacity.cached(model, base.engine, w, base.loadgen, m)
        if cal is None:
            return None
    planned = _plan(real, loads, cal, w)
    total = capacity.estimate(planned, cal, probes)
    if budget and total > budget - (time.monotonic() - t0) and any(p["relative"] for p in planned):
        most = max(p["num_requests"] for p in planned if p["relative"])
        left = budget - (time.monotonic() - t0)
        n, scale = capacity.fit_requests(planned, cal, probes, left, floor), 1.0
        if n <= floor and capacity.estimate(_cut(planned, n), cal, probes) > left:
            scale = capacity.fit_lengths(planned, cal, probes, left, floor, base.experiment.min_length_scale)
        if scale < 1.0:
            guess = " (capacity predicted from one request's latency)" if cal.get("predicted") else ""
            print(f"the full sweep would take ~{total / 60:.1f} min here{guess}, and ~"
                  f"{capacity.estimate(_cut(planned, floor), cal, probes) / 60:.1f} min at the floor of {floor} "
                  f"requests per load point (experiment.min_requests): over experiment.time_budget_s={budget:g}, so "
                  f"the requests are {scale:g}x as long (workload.length_scale={w.length_scale * scale:g}; the "
                  f"loads stay fractions of the capacity at those lengths, measured now). "
                  f"experiment.time_budget_s=null runs the workload as it is.", flush=True)
            w = dataclasses.replace(w, length_scale=w.length_scale * scale)
            cal = capacity.resolve(model, base.engine, base.server, w, base.loadgen, m, sweep_dir)
            planned = _plan(real, loads, cal, w)
            left = budget - (time.monotonic() - t0)
            n = capacity.fit_requests(planned, cal, probes, left, floor)
        if scale < 1.0:
            print(f"at those lengths, {n} of the {most} requests per load point fit the budget", flush=True)
        elif n < most:
            print(f"the full sweep would take ~{total / 60:.1f} min here, over experiment.time_budget_s={budget:g}: "
                  f"{n} requests per load point instead of {most} (experiment.time_budget_s=null runs them all)",
                  flush=True)
        planned = _cut(planned, n)
        total = capacity.estimate(planned, cal, probes)
        if sweep_dir:
            cache.update(Path(sweep_dir) / "capacity.json", capacity.SIZING,
                         {"num_requests": n, "length_scale": scale, "time_budget_s": budget})
    if any(x is not None for x in loads):
        pairs = sorted({(x, capacity.rate_for(x, cal)) for x in loads if x is not None})
        print(f"load -> rate (capacity {cal['capacity_rps']:.2f} req/s: the unified engine on this machine, "
              f"{model.path or model.name} in {model.dtype}): "
              + ", ".join(f"{x:g} -> {r:.2f} req/s" for x, r in pairs), flush=True)
    slo_cfg = base.slo
    if not relative(slo_cfg) and (cal["single_ttft_s"] > slo_cfg.ttft_s / 2 or cal["single_tpot_s"] > slo_cfg.tpot_s / 2):
        print(f"warning: one request alone takes TTFT {1e3 * cal['single_ttft_s']:.0f} ms / TPOT "
              f"{1e3 * cal['single_tpot_s']:.0f} ms on this machine, over half the SLOs ({slo_cfg.ttft_s:g} s / "
              f"{1e3 * slo_cfg.tpot_s:g} ms): little will meet them at any load. slo=machine_relative sets them "
              f"relative to this machine's own latency.", flush=True)
    caveat = f" (for the base {model.path or model.name}/{w.name}; the sweep changes {sorted(group_keys)})" \
        if group_keys else ""
    print(f"estimated wall time: {total / 60:.1f} min for {len(real)} real job(s){caveat}", flush=True)
    return total
