"""Offered load relative to the machine: `workload.load` = a fraction of the unified engine's measured capacity.

A rate in req/s means different things on different CPUs: the demo's 2, 4 and 6 req/s straddle the unified
engine's knee on the machine it was tuned on, and sit past it everywhere on a CPU four times slower (every engine
saturated, nothing to compare) or below it on a faster one. `workload.load=0.9` instead asks for 0.9x the
*capacity*: the request throughput the unified engine (prefill priority, default batch limits) sustains on
this machine, for this model, dtype and workload, with `CONCURRENCY` requests in flight (closed loop, the first
wave left out). A short calibration measures it once and caches it beside the SLO baselines
(~/.cache/semipd_engine/capacity.json; delete it to recalibrate); the same server run measures the
single-request latencies that SLO scales (`slo.scale`, `slo.ttft_scale`, `slo.tpot_scale`) multiply, so a
machine-relative demo costs one server start the first time and none after. A calibration disturbed by other
processes is used for that sweep but not cached.

`estimate` turns a calibration into the wall time a sweep of real jobs will take (server start, step probes,
the load itself, drain), printed before a sweep starts.
"""

from __future__ import annotations

import dataclasses
import logging
import tempfile
import time
from pathlib import Path
from typing import Any, Optional

from experiments.sweep import probe
from experiments.sweep.slo import baseline_key
from experiments.sweep.slo import cache_path as slo_cache_path
from semipd_engine import cache

log = logging.getLogger(__name__)
# Requests in flight while the capacity is measured: enough to keep the unified engine's batch as full as an
# open-loop overload does (at 16 the closed loop read ~10% under the throughput the engine sustained at 1.35x).
CONCURRENCY = 32
MEASURED = 32  # requests counted after the first wave
BASELINE_REQUESTS = 8  # single requests at the mean lengths (the SLO baseline's protocol)
# Per job, besides its server start, probes and load: the job's process, stopping the server, the summary, W&B,
# figures, and the drain past one request's latency. Measured over the demo's 12 jobs (docs/benchmarks.md): with
# 12 s here the estimates ran 7-10 s a job over what the jobs took, both on a 2-core EPYC with native bf16 and on
# the same CPU made half as fast in float32.
JOB_FIXED_S = 5.0
# The unified engine's capacity (req/s) times one request's latency alone (s), as measured on three machines
# (docs/benchmarks.md, the default demo): 3.2 (native bf16), 1.8 (float32), 1.7 (float32 at half the speed).
# A capacity predicted from the single-request run alone lies between these two multiples of 1 / latency; the
# prediction only decides that a sweep cannot fit its time budget at these lengths (skipping a long saturated run
# on a slow machine), never the rate of a load.
CAPACITY_X_E2E = (1.7, 3.2)
# When even `min_requests` per point is over the budget, the requests get shorter: these multiples of the
# workload's lengths are tried in turn (never below `experiment.min_length_scale`).
LENGTH_STEPS = (0.75, 0.5, 0.375, 0.25)


def cache_path() -> Path:
    return cache.cache_dir() / "capacity.json"


def reference_engine(engine_cfg):
    """The engine whose capacity is the unit: unified, prefill priority, default batch limits, the job's KV pool.
    One reference for every engine of a sweep, so a load means the same rate whichever engine runs it."""
    from semipd_engine.config import EngineConfig, freeze

    return freeze(EngineConfig, {"name": "unified", "policy": "prefill_priority", "block_size": engine_cfg.block_size,
                                 "num_kv_blocks": engine_cfg.num_kv_blocks, "kv_cache_mb": engine_cfg.kv_cache_mb,
                                 "watermark": engine_cfg.watermark})


def capacity_key(model_cfg, engine_cfg, wcfg, lcfg, machine: dict) -> str:
    w, engine_cfg = wcfg, reference_engine(engine_cfg)
    return (f"{model_cfg.path or model_cfg.name}|{model_cfg.dtype}|{machine.get('cpu')}|{machine.get('cores')} cores"
            f"|{w.name}|p{w.prompt_mean}s{w.prompt_sigma}|o{w.output_mean}s{w.output_sigma}|x{w.length_scale}"
            f"|max{w.max_prompt_len}/{w.max_total_len}|seqs{engine_cfg.max_num_seqs}"
            f"|tok{engine_cfg.max_num_batched_tokens}|{lcfg.endpoint}")


def cached(model_cfg, engine_cfg, wcfg, lcfg, machine: dict) -> Optional[dict[str, Any]]:
    return cache.read(cache_path()).get(capacity_key(model_cfg, engine_cfg, wcfg, lcfg, machine))


def measure(model_cfg, engine_cfg, server_cfg, wcfg, lcfg, machine: dict, worth=None) -> dict[str, Any]:
    """Start the unified engine once: its start-up time, single-request latencies, and its capacity.

    `worth(partial)`, given the start-up time and single-request latencies, may say the saturated run is not
    worth making (False): the capacity is then predicted from them (`predicted`: the lower of CAPACITY_X_E2E)."""
    from experiments.loadgen import run_loadgen
    from experiments.sweep.config import SLOConfig
    from experiments.sweep.host import HostMonitor
    from experiments.sweep.launch import EngineServer
    from experiments.sweep.slo import baseline_probe
    from semipd_engine.config import freeze

    unified = reference_engine(engine_cfg)
    conc = max(1, min(CONCURRENCY, unified.max_num_seqs))
    # Conversations hold a slot through their turns: sent back to back (no think time), the slots stay busy
    sat = dataclasses.replace(wcfg, arrival="closed", max_concurrency=conc, num_requests=conc + MEASURED,
                              think_time_s=0.0)
    slo = freeze(SLOConfig, {})
    with tempfile.TemporaryDirectory(prefix="capacity-") as d, HostMonitor(
            max_interference=0.1, max_steal=0.05) as mon:
        t0 = time.monotonic()
        with EngineServer(model_cfg, unified, server_cfg, d) as srv:
            startup_s = time.monotonic() - t0
            lc = dataclasses.replace(lcfg, base_url=srv.url, progress=False)
            one = run_loadgen(lc, baseline_probe(wcfg, BASELINE_REQUESTS), slo).aggregates
            single = {"startup_s": startup_s, "single_ttft_s": one.ttft_s.p50, "single_tpot_s": one.tpot_s.p50,
                      "single_e2e_s": one.e2e_s.p50}
            if worth is not None and one.e2e_s.p50 and not worth(single):
                host = mon.stop()
                return {**single, "capacity_rps": CAPACITY_X_E2E[0] / one.e2e_s.p50, "predicted": True,
                        "host_valid": host.get("valid", True), "host_foreign_cpu_frac": host.get("foreign_cpu_frac"),
                        "measured_at": time.time(), "seconds": time.monotonic() - t0}
            a = run_loadgen(dataclasses.replace(lc, warmup_requests=conc), sat, slo).aggregates
    if a.num_errors or not a.request_throughput:
        raise RuntimeError(f"capacity calibration failed: {a.num_errors} errors, throughput {a.request_throughput}")
    host = mon.result()
    return {"capacity_rps": a.request_throughput, "concurrency": conc, "measured_requests": a.num_requests,
            "startup_s": startup_s, "single_ttft_s": one.ttft_s.p50, "single_tpot_s": one.tpot_s.p50,
            "single_e2e_s": one.e2e_s.p50, "saturated_p50_e2e_s": a.e2e_s.p50,
            "host_valid": host.get("valid", True), "host_foreign_cpu_frac": host.get("foreign_cpu_frac"),
            "measured_at": time.time(), "seconds": time.monotonic() - t0}


def resolve(model_cfg, engine_cfg, server_cfg, wcfg, lcfg, machine: dict,
            sweep_dir: Optional[str] = None, worth=None) -> dict[str, Any]:
    """The machine's capacity for this model and workload: the sweep's own (every job of a sweep, and a resumed
    sweep, uses the one its first job saw), else cached, else measured (and cached when quiet). With `worth`
    (see `measure`) a predicted capacity may come back (`predicted`); without it, only a measured one."""
    key = capacity_key(model_cfg, engine_cfg, wcfg, lcfg, machine)
    pinned = Path(sweep_dir) / "capacity.json" if sweep_dir else None

    def usable(entry):
        return entry and (worth is not None or not entry.get("predicted"))

    own = cache.read(pinned).get(key) if pinned else None
    if usable(own):
        return {**own, "cached": True}
    hit = cache.read(cache_path()).get(key)
    if usable(hit):
        if pinned:
            cache.update(pinned, key, hit)
        return {**hit, "cached": True}
    log.info("measuring the unified engine's capacity on this machine for %s", key)
    print(f"calibrating: the unified engine's capacity for {model_cfg.path or model_cfg.name} ({model_cfg.dtype}) "
          f"on this machine (one server start, ~{BASELINE_REQUESTS + CONCURRENCY + MEASURED} requests; cached)",
          flush=True)
    cal = measure(model_cfg, engine_cfg, server_cfg, wcfg, lcfg, machine, worth)
    what = "predicted from one request's latency (the saturated run skipped: too slow for the budget)" \
        if cal.get("predicted") else "capacity"
    print(f"calibrated: {what} {cal['capacity_rps']:.2f} req/s, single request TTFT "
          f"{1e3 * cal['single_ttft_s']:.0f} ms / TPOT {1e3 * cal['single_tpot_s']:.1f} ms, server start "
          f"{cal['startup_s']:.0f} s (took {cal['seconds']:.0f} s)", flush=True)
    if cal["host_valid"]:
        cache.update(cache_path(), key, cal)
        # The same single-request latencies are the SLO baseline for these lengths: no second server start.
        cache.update(slo_cache_path(), baseline_key(model_cfg, wcfg, machine),
                     {"ttft_s": cal["single_ttft_s"], "tpot_s": cal["single_tpot_s"]})
    else:
        log.warning("capacity calibration disturbed: other processes used %.0f%% of the cores; used for this sweep, "
                    "not cached", 100 * (cal.get("host_foreign_cpu_frac") or 0))
    if pinned:
        cache.update(pinned, key, cal)
    return {**cal, "cached": False}


SIZING = "sizing"  # the entry of a sweep's capacity.json that fixes its load points' request count


def sweep_sizing(sweep_dir: Optional[str]) -> Optional[dict[str, Any]]:
    return cache.read(Path(sweep_dir) / "capacity.json").get(SIZING) if sweep_dir else None


def fit_requests(planned: list[dict[str, Any]], cal: dict[str, Any], probes: int, budget: float, floor: int) -> int:
    """The most requests per load point (no fewer than `floor`) for which the sweep's estimate fits `budget`."""
    hi = max(p["num_requests"] for p in planned if p["relative"])
    n = hi
    while n > floor:
        trial = [{**p, "num_requests": min(p["num_requests"], n)} if p["relative"] else p for p in planned]
        if estimate(trial, cal, probes) <= budget:
            break
        n -= 1
    return max(n, min(floor, hi))


def at_lengths(cal: dict[str, Any], scale: float) -> dict[str, Any]:
    """A calibration predicted for requests `scale` times as long: the work of a request (its prefill, its decode
    steps) is about proportional to its lengths, so the capacity scales by 1/scale and one request's latency by
    scale; a decode step's time stays. Used only to choose a scale: the chosen one is then measured."""
    return {**cal, "capacity_rps": cal["capacity_rps"] / scale, "single_ttft_s": cal["single_ttft_s"] * scale,
            "single_e2e_s": cal["single_e2e_s"] * scale}


def fit_lengths(planned: list[dict[str, Any]], cal: dict[str, Any], probes: int, budget: float, floor: int,
                min_scale: float) -> float:
    """The longest requests (a multiple of the workload's lengths, 1 or one of LENGTH_STEPS, >= `min_scale`) for
    which `planned` at `floor` requests per load point is estimated to fit `budget`; the shortest allowed when
    none does. Load points (`"load"` set) keep their load, so their rate grows as the requests shrink."""
    steps = [s for s in (1.0, *LENGTH_STEPS) if s >= min_scale] or [1.0]
    for s in steps:
        c = at_lengths(cal, s)
        trial = [{**p, "num_requests": min(p["num_requests"], floor), "rate": rate_for(p["load"], c)}
                 if p["relative"] else p for p in planned]
        if estimate(trial, c, probes) <= budget:
            return s
    return steps[-1]


def rate_for(load: float, cal: dict[str, Any]) -> float:
    return load * cal["capacity_rps"]


def job_seconds(rate: float, num_requests: int, cal: dict[str, Any], probe_requests: int) -> float:
    """Wall time of one real job: start, probes before and after, arrivals (or the backlog draining at
    capacity, past the knee), the last request's latency, and the fixed per-job work."""
    load_s = num_requests / max(min(rate, cal["capacity_rps"]), 1e-9)
    probe_s = 2 * probe_requests * (cal["single_ttft_s"] + (probe.OUTPUT_LEN - 1) * cal["single_tpot_s"])
    return cal["startup_s"] + probe_s + load_s + cal["single_e2e_s"] + JOB_FIXED_S


def estimate(jobs: list[dict[str, Any]], cal: dict[str, Any], probe_requests: int) -> float:
    """Seconds for `jobs` ({"rate": req/s, "num_requests": n}) run one after another."""
    return sum(job_seconds(j["rate"], j["num_requests"], cal, probe_requests) for j in jobs)


# --- before a sweep starts ----------------------------------------------------------------------------------------

def sweep_overrides(config) -> list[list[str]]:
    """Each job's overrides as Hydra composes them (`+key=value` kept), expanded as its basic sweeper does."""
    from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
    from hydra.core.override_parser.overrides_parser import OverridesParser

    from hydra_plugins.semipd_launchers.sweeper import one_rate_axis

    params, task = one_rate_axis(config.hydra.get("sweeper", {}).get("params") or {}, config.hydra.overrides.task)
    args = [f"{k}={v}" for k, v in params.items()] + task
    chunks = BasicSweeper.split_arguments(OverridesParser.create().parse_overrides(args), None)
    return [list(job) for chunk in chunks for job in chunk]


def sweep_jobs(config) -> list[dict[str, str]]:
    """Each job's overrides (key -> value as typed; a `+` or `~` prefix dropped)."""
    return [dict(o.lstrip("+~").split("=", 1) for o in job) for job in sweep_overrides(config)]
