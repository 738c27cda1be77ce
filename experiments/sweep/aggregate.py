"""Sweep aggregation: every job of a multirun -> one parquet, one summary table, figures.

Registered as a Hydra callback (`on_multirun_end`), and callable on any sweep
directory (`aggregate_sweep`). Failed jobs stay in summary.csv with their error.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import pandas as pd
from hydra.experimental.callback import Callback
from omegaconf import DictConfig

log = logging.getLogger(__name__)
TABLE_COLUMNS = ["engine", "rate", "status", "slo_attainment", "p90_ttft_s", "p90_tpot_s", "mean_e2e_s",
                 "request_throughput", "goodput_rate", "num_errors"]


def job_dirs(sweep_dir: Path) -> list[Path]:
    return sorted(p.parent for p in Path(sweep_dir).rglob("job.json") if "probes" not in p.parts)


def _override_value(v: str) -> Any:
    try:
        return json.loads(v)
    except (json.JSONDecodeError, TypeError):
        return v


def aggregate_sweep(sweep_dir: str | Path) -> tuple[pd.DataFrame, pd.DataFrame]:
    sweep_dir = Path(sweep_dir)
    rows, frames, swept_keys = [], [], set()
    for jd in job_dirs(sweep_dir):
        job = json.loads((jd / "job.json").read_text())
        job.pop("traceback", None)
        swept = {k: _override_value(v) for k, v in (job.pop("overrides", None) or {}).items()}
        swept_keys.update(swept)
        slo = job.pop("slo", None) or {}
        row = {"job": str(jd.relative_to(sweep_dir)), **job, **{f"slo_{k}": v for k, v in slo.items()},
               **{k: v for k, v in swept.items() if k not in ("engine",)}}
        rows.append(row)
        req = jd / "requests.parquet"
        if req.is_file():
            df = pd.read_parquet(req)
            extra = {"job": row["job"], "engine": job["engine"], "rate": job["rate"], "status": job["status"],
                     "slo_ttft_s": slo.get("ttft_s"), "slo_tpot_s": slo.get("tpot_s"), **swept}
            # A list-valued override (experiment.goodput_seeds=[0,1]) is one value per row, not a column.
            frames.append(df.assign(**{k: json.dumps(v) if isinstance(v, (list, dict)) else v
                                       for k, v in extra.items() if k not in df.columns}))
    summary = pd.DataFrame(rows)
    summary.attrs["swept"] = sorted(swept_keys)
    requests = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()
    summary.to_csv(sweep_dir / "summary.csv", index=False)
    if not requests.empty:
        requests.to_parquet(sweep_dir / "requests.parquet", index=False)
    return summary, requests


def format_table(summary: pd.DataFrame, swept: list[str] = ()) -> str:
    if summary.empty:
        return "(no jobs)"
    extra = [k for k in swept if k in summary.columns and k not in ("engine", "workload.rate", "experiment")]
    cols = ["engine", *extra] + [c for c in TABLE_COLUMNS if c in summary.columns and c != "engine"]
    df = summary[cols].copy()
    for c in ("p90_ttft_s", "p90_tpot_s", "mean_e2e_s"):
        if c in df:
            df[c] = (df[c] * 1e3).round(1)
            df = df.rename(columns={c: c.replace("_s", "_ms")})
    if "slo_attainment" in df:
        df["slo_attainment"] = (df["slo_attainment"] * 100).round(1)
    return df.sort_values([c for c in ("engine", *extra, "rate") if c in df]).to_string(index=False)


def finish_sweep(sweep_dir: Path, wandb_cfg=None) -> None:
    from experiments.analysis import figures
    from experiments.sweep import tracking

    summary, requests = aggregate_sweep(sweep_dir)
    paths = figures.make_figures(sweep_dir)
    n_ok = int((summary["status"] == "ok").sum()) if len(summary) else 0
    table = format_table(summary, summary.attrs.get("swept", []))
    print(f"\nsweep {sweep_dir}: {len(summary)} jobs ({n_ok} ok)\n{table}")
    print(f"aggregate: {sweep_dir / 'requests.parquet'}, {sweep_dir / 'summary.csv'}; figures: {sweep_dir / 'figures'}")
    if wandb_cfg is not None:
        try:
            tracking.log_sweep(wandb_cfg, str(sweep_dir), summary, paths)
        except Exception as e:
            log.warning("W&B sweep logging failed: %s", e)


class AggregateCallback(Callback):
    """hydra.callbacks.aggregate: aggregates the sweep once every job has run."""

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        from experiments.sweep.config import WandbConfig
        from semipd_engine.config import freeze

        finish_sweep(Path(config.hydra.sweep.dir), freeze(WandbConfig, config.wandb))
