"""The engine's step time before and after the load, against its calibrated value on this machine.

The host check sees CPU time taken by others; it cannot see a machine that is slower than usual for reasons
that leave no CPU time behind (frequency, memory bandwidth taken by a neighbour on another core, a hypervisor
that hides its steal). A short probe can: `experiment.step_probe_requests` requests sent one at a time (16-token
prompts, 8-token answers) right before and right after the load; their median TPOT is the engine's step time
at batch 1 plus the serving path's per-token cost. A run is flagged when the probe after the load is more than
`experiment.max_step_slowdown` times the one before, or when the probe before it is that much slower than the
first probe recorded for the same model, engine, cores and machine on a run whose host check passed (kept in
the cache folder next to the SLO baselines, `step_probe.json`; delete it to recalibrate).

The probe's requests reach the engine like any other (a dynamic partitioner sees them in its first window);
they are not in requests.parquet. A semi-PD engine's step time depends on its partition and on how shares are
enforced (CPU-time quotas or core sets), so both are in the calibration's key; when a controller moved the
partition during the load, the probe after it measures another partition and is recorded, not compared.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
from typing import Any, Optional

from semipd_engine import cache

log = logging.getLogger(__name__)
# 16-token prompts, 8-token answers: 7 decode steps a request, 21 over the default 3 requests, enough for a
# median to within a few percent; longer answers cost a slow CPU seconds per job (two probes a job) for nothing.
PROMPT_LEN, OUTPUT_LEN = 16, 8


def calibration_path():
    return cache.cache_dir() / "step_probe.json"


def calibration_key(job, cores: list[int], machine: dict) -> str:
    from semipd_engine.topology.engines import engine_kind

    e, m = job.engine, job.model
    backend = ""
    if "partition_backend" in engine_kind(e.name).keys:  # what enforces the shares changes the step time
        from semipd_engine.shares.partition import resolve_backend

        backend = f"|{resolve_backend(e.partition_backend, m.device)}"
    if e.name == "external":  # every external engine is named `external`: its command (or URL) says which
        x = e.external
        backend = "|" + hashlib.sha1(f"{x.command or x.url}|{x.extra_args}".encode()).hexdigest()[:12]
    return (f"{m.path or m.name}|{m.dtype}|{e.name}|{e.policy}|p{e.prefill_share}|d{e.decode_share}|t{e.num_threads}"
            f"{backend}|{machine.get('cpu')}|{len(cores)} cores|probe {PROMPT_LEN}x{OUTPUT_LEN}")


def measure(url: str, lcfg, wcfg, n: int) -> Optional[dict[str, float]]:
    """Median TTFT and TPOT of `n` requests sent one at a time; None when the probe itself failed;
    {"interrupted": True} when a signal stopped it (the caller stops the job)."""
    from experiments.loadgen import run_loadgen
    from experiments.sweep.config import SLOConfig
    from semipd_engine.config import freeze

    probe = dataclasses.replace(wcfg, name="fixed", arrival="closed", max_concurrency=1, num_requests=n, multi_turn=False,
                                prompt_len=PROMPT_LEN, output_len=OUTPUT_LEN, length_scale=1.0)
    lc = dataclasses.replace(lcfg, base_url=url, progress=False, warmup_requests=0, tokenizer="none",
                             prompt_format="text", warmup_s=0.0, cooldown_s=0.0)
    try:
        s = run_loadgen(lc, probe, freeze(SLOConfig, {}))
    except Exception as e:  # a probe must never lose a measurement
        log.warning("step probe failed: %s", e)
        return None
    if s.interrupted:
        return {"interrupted": True}
    a = s.aggregates
    if a.num_errors or a.tpot_s.p50 is None:
        return None
    return {"tpot_s": a.tpot_s.p50, "ttft_s": a.ttft_s.p50}


def verdict(before: Optional[dict], after: Optional[dict], calibrated: Optional[dict], max_slowdown: float,
            host_valid: bool, partition_moved: bool = False) -> dict[str, Any]:
    """Compare the probes; `save` says whether `before` should become the calibration."""
    out: dict[str, Any] = {"before": before, "after": after, "calibrated": calibrated, "max_slowdown": max_slowdown,
                           "reasons": [], "save": False}
    if before is None:
        out["note"] = "probe before the load failed or is off"
        return out
    if after is not None:
        out["after_over_before"] = after["tpot_s"] / before["tpot_s"]
        if partition_moved:
            out["note"] = "after/before not compared: the controller moved the partition during the load"
        elif out["after_over_before"] > max_slowdown:
            out["reasons"].append(f"engine step probe: TPOT {1e3 * after['tpot_s']:.2f} ms after the load vs "
                                  f"{1e3 * before['tpot_s']:.2f} ms before ({out['after_over_before']:.1f}x)")
    if calibrated is None:
        out["save"] = host_valid and not out["reasons"]
    else:
        out["before_over_calibrated"] = before["tpot_s"] / calibrated["tpot_s"]
        if out["before_over_calibrated"] > max_slowdown:
            out["reasons"].append(f"engine step probe: TPOT {1e3 * before['tpot_s']:.2f} ms before the load is "
                                  f"{out['before_over_calibrated']:.1f}x its calibrated "
                                  f"{1e3 * calibrated['tpot_s']:.2f} ms on this machine")
    return out


def load_calibration(key: str) -> Optional[dict]:
    return cache.read(calibration_path()).get(key)


def save_calibration(key: str, value: dict) -> None:
    cache.update(calibration_path(), key, value)
