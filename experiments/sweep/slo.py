"""SLOs: absolute, or a scale of the engine's measured single-request latency.

The paper sets tight / loose SLOs at ~7.5x / ~10x the latency of one request
alone. That baseline is measured once per model, dtype, machine and workload
shape (with the unified engine, so every engine is judged against the same
numbers) and cached in ~/.cache/semipd_engine/slo_baselines.json.
"""

from __future__ import annotations

import dataclasses
import logging
import tempfile
from pathlib import Path
from typing import Any, Optional

from semipd_engine import cache
from semipd_engine.topology.engines import retarget

log = logging.getLogger(__name__)


def cache_path() -> Path:
    return cache.cache_dir() / "slo_baselines.json"


def baseline_key(model_cfg, wcfg, machine: dict) -> str:
    model = model_cfg.path or model_cfg.name
    return (f"{model}|{model_cfg.dtype}|{machine.get('cpu')}|{machine.get('cores')}|"
            f"{machine.get('gpus')}|p{wcfg.prompt_mean * wcfg.length_scale:.0f}|o{wcfg.output_mean * wcfg.length_scale:.0f}")


def baseline_probe(wcfg, n: int = 8):
    """`n` requests one at a time at the workload's mean lengths: the single-request baseline's workload."""
    return dataclasses.replace(
        wcfg, name="fixed", arrival="closed", max_concurrency=1, num_requests=n, length_scale=1.0, multi_turn=False,
        prompt_len=max(1, round(wcfg.prompt_mean * wcfg.length_scale)),
        output_len=max(2, round(wcfg.output_mean * wcfg.length_scale)))


def measure_baseline(model_cfg, engine_cfg, server_cfg, wcfg, lcfg) -> dict[str, float]:
    """Median TTFT and TPOT of requests sent one at a time at the workload's mean lengths."""
    from experiments.loadgen import run_loadgen
    from experiments.sweep.config import SLOConfig
    from experiments.sweep.launch import EngineServer
    from semipd_engine.config import freeze

    unified = retarget(engine_cfg, "unified", policy="prefill_priority")
    with tempfile.TemporaryDirectory(prefix="slo-baseline-") as d, \
            EngineServer(model_cfg, unified, server_cfg, d) as srv:
        a = run_loadgen(dataclasses.replace(lcfg, base_url=srv.url, progress=False), baseline_probe(wcfg),
                        freeze(SLOConfig, {})).aggregates
    return {"ttft_s": a.ttft_s.p50, "tpot_s": a.tpot_s.p50}


def scales(slo_cfg) -> tuple[Optional[float], Optional[float]]:
    """The multiples of the baseline for TTFT and TPOT (None: that SLO is absolute)."""
    ttft = slo_cfg.ttft_scale if slo_cfg.ttft_scale is not None else slo_cfg.scale
    tpot = slo_cfg.tpot_scale if slo_cfg.tpot_scale is not None else slo_cfg.scale
    return ttft, tpot


def relative(slo_cfg) -> bool:
    return any(x is not None for x in scales(slo_cfg))


def apply_scales(slo_cfg, base: dict[str, float]) -> dict[str, Any]:
    ts, ps = scales(slo_cfg)
    out = {"ttft_s": slo_cfg.ttft_s if ts is None else ts * base["ttft_s"],
           "tpot_s": slo_cfg.tpot_s if ps is None else ps * base["tpot_s"],
           "scale": slo_cfg.scale, "baseline_ttft_s": base["ttft_s"], "baseline_tpot_s": base["tpot_s"]}
    if slo_cfg.ttft_scale is not None or slo_cfg.tpot_scale is not None:
        out.update(ttft_scale=ts, tpot_scale=ps)
    return out


def resolve_slo(slo_cfg, model_cfg, engine_cfg, server_cfg, wcfg, lcfg, machine: dict) -> dict[str, Any]:
    if not relative(slo_cfg):
        return {"ttft_s": slo_cfg.ttft_s, "tpot_s": slo_cfg.tpot_s, "scale": None}
    path, key = cache_path(), baseline_key(model_cfg, wcfg, machine)
    base = cache.read(path).get(key)
    if base is None:
        log.info("measuring the single-request latency baseline for %s", key)
        base = measure_baseline(model_cfg, engine_cfg, server_cfg, wcfg, lcfg)
        cache.update(path, key, base)
    return apply_scales(slo_cfg, base)
