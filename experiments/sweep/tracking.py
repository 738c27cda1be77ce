"""Weights & Biases tracking: one run per job, one summary run per sweep, all of a sweep's runs in one place.

Offline by default: every run of a sweep (each job's and the sweep's summary run) is written under
`<sweep dir>/wandb/` (a single run's: `<job dir>/wandb/`) and uploaded later with
`wandb sync <sweep dir>/wandb/offline-run-*`. Nothing here waits on the network; mode=disabled (the tests)
skips W&B entirely.

What a researcher finds there:
- runs grouped by experiment (`experiment.name`), tagged and configured with the sweep id (the sweep
  directory's name) so that repeated sweeps of one experiment stay apart; job_type = the engine;
- tables with typed columns (numbers stay numbers, booleans booleans; lists and dicts as JSON text), so that
  W&B can sort, filter and plot them: `requests` per job, `summary`, `points` and `goodput` per sweep;
- each job's server metrics during the load as time series (`server/*` against `server/t_s`), its semi-PD
  partition decisions (`partition/*` against `partition/t_s`), and its own figures; the sweep's figures.
"""

from __future__ import annotations

import json
import logging
import math
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any, Optional

import numpy as np
import pandas as pd

from experiments.analysis.sweep_dir import PER_TOKEN  # a job's would dwarf the rest of its requests table

log = logging.getLogger(__name__)



def flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flatten(v, key + "/"))
        elif isinstance(v, (int, float, str, bool)) or v is None:
            out[key] = v
    return out


def _cell(v: Any) -> Any:
    if isinstance(v, np.ndarray):
        return v.tolist()
    if isinstance(v, np.generic):
        v = v.item()
    if v is None or v is pd.NA or v is pd.NaT or (isinstance(v, float) and math.isnan(v)):
        return None
    return v


def _text(v: Any) -> str:
    if isinstance(v, (list, tuple, dict)):
        return json.dumps(v, default=str)
    if isinstance(v, pd.Timestamp):
        return v.isoformat()
    return str(v)


def _column(values: pd.Series) -> list[Any]:
    """One column's cells as W&B should type them: all booleans -> bool, all numbers -> numbers, anything else
    (text, lists, dicts, a mix) -> text; missing values (NaN, None, NA) -> None in every case."""
    cells = [_cell(v) for v in values.tolist()]
    present = [v for v in cells if v is not None]
    if all(isinstance(v, bool) for v in present):
        return cells
    if all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in present):
        return cells
    return [None if v is None else _text(v) for v in cells]


def table_data(df: pd.DataFrame) -> tuple[list[str], list[list[Any]]]:
    """(columns, rows) of a frame, typed column by column (`_column`)."""
    columns = [str(c) for c in df.columns]
    cells = [_column(df[c]) for c in df.columns]
    return columns, [list(row) for row in zip(*cells)]


def to_table(df: pd.DataFrame):
    import wandb

    columns, data = table_data(df)
    return wandb.Table(columns=columns, data=data)


def _tags(wcfg, sweep_id: str) -> list[str]:
    return [*wcfg.tags, sweep_id[:64]]  # W&B refuses longer tags; a sweep id from a custom directory can be


def _settings():
    import wandb

    # No console capture, no stats thread: quiet in job logs, nothing that can block.
    return wandb.Settings(console="off", x_disable_stats=True, init_timeout=120, silent=True)


def _finite(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _log_series(run, frame: pd.DataFrame, prefix: str, time_col: str = "time_s") -> int:
    """One `run.log` per sample, its time under `<prefix>/t_s` (the x axis of every `<prefix>/*` chart)."""
    run.define_metric(f"{prefix}/t_s")
    # The run's summary keeps each series' peak (the longest queue, the fullest KV cache), not its last sample.
    run.define_metric(f"{prefix}/*", step_metric=f"{prefix}/t_s", summary="max")
    n = 0
    for row in frame.sort_values(time_col).to_dict("records"):
        values = {f"{prefix}/{k}": float(v) for k, v in row.items() if k != time_col and _finite(v)}
        if values and _finite(row[time_col]):
            run.log({f"{prefix}/t_s": float(row[time_col]), **values})
            n += 1
    return n


def server_series(job_dir: str | Path) -> Optional[pd.DataFrame]:
    """The job's server metrics during the load, one row per sample (time in `time_s`); None if none."""
    from experiments.analysis.server_metrics import job_timeseries

    wide = job_timeseries(Path(job_dir))
    return None if wide is None else wide.drop(columns=["clock"])


def partition_series(job_dir: str | Path) -> Optional[pd.DataFrame]:
    """Semi-PD partition decisions (real or simulated), on the load's clock; None if the job logged none."""
    from experiments.analysis.figures import partition_timeline

    t = partition_timeline(Path(job_dir))
    if t.empty:
        return None
    t = t.rename(columns={"prefill": "prefill_share", "decode": "decode_share", "rate": "arrival_rate"})
    return t[[c for c in ("time_s", "prefill_share", "decode_share", "arrival_rate", "observed_ttft_s",
                          "observed_tpot_s") if c in t]]


def logs_job(wcfg, simulated: bool) -> bool:
    """Does a job get a W&B run of its own (`wandb.per_job_runs`; null: real engines yes, simulated jobs no)?"""
    if wcfg.mode == "disabled":
        return False
    return (not simulated) if wcfg.per_job_runs is None else bool(wcfg.per_job_runs)


def log_job(wcfg, job_dir: str, wandb_dir: str, name: str, group: str, sweep_id: str, job_type: str, config: dict,
            summary: dict[str, Any], requests: Optional[pd.DataFrame]) -> Optional[str]:
    """Log one job into `<wandb_dir>/wandb/`; returns the run's local directory (None when disabled)."""
    if wcfg.mode == "disabled":
        return None
    import wandb

    from experiments.analysis.figures import job_figures

    os.environ.setdefault("WANDB_SILENT", "true")
    with wandb.init(project=wcfg.project, entity=wcfg.entity, mode=wcfg.mode, dir=wandb_dir, name=name,
                    group=group, job_type=job_type, config={**config, "sweep_id": sweep_id},
                    tags=_tags(wcfg, sweep_id), settings=_settings(), reinit="create_new") as run:
        run.summary.update(flatten(summary))
        if requests is not None and len(requests):
            run.log({"requests": to_table(requests.drop(columns=[c for c in PER_TOKEN if c in requests]))})
        for prefix, frame in (("server", server_series(job_dir)), ("partition", partition_series(job_dir))):
            if frame is not None:
                _log_series(run, frame, prefix)
        try:
            paths = job_figures(job_dir)
        except Exception as e:  # a figure that cannot be drawn must not cost the run its tables and series
            log.warning("job figures for %s failed: %s", job_dir, e)
            paths = []
        for path in paths:
            run.log({f"figures/{Path(path).stem}": wandb.Image(path)})
        return run.dir


def log_sweep(wcfg, sweep_dir: str, summary: pd.DataFrame, figures: list[str], group: str,
              points: Optional[pd.DataFrame] = None, goodput: Optional[pd.DataFrame] = None,
              more_figures: Optional[Callable[[], list[str]]] = None) -> Optional[str]:
    """One summary run per sweep, beside its jobs' runs: the aggregate tables and the figures. `more_figures`:
    figures still being drawn (another process), asked for once the rest is logged."""
    if wcfg.mode == "disabled":
        return None
    import wandb

    os.environ.setdefault("WANDB_SILENT", "true")
    sweep_id = os.path.basename(os.path.normpath(sweep_dir))
    config = {"sweep_id": sweep_id, "experiment": group, "swept": list(summary.attrs.get("swept", []))}
    with wandb.init(project=wcfg.project, entity=wcfg.entity, mode=wcfg.mode, dir=sweep_dir, name=f"{sweep_id}-summary",
                    group=group, job_type="sweep-summary", config=config, tags=_tags(wcfg, sweep_id),
                    settings=_settings(), reinit="create_new") as run:
        run.log({"summary": to_table(summary.drop(columns=[c for c in ("traceback",) if c in summary.columns]))})
        for key, df in (("points", points), ("goodput", goodput)):
            if df is not None and not df.empty:
                run.log({key: to_table(df)})
        for path in [*figures, *(more_figures() if more_figures is not None else [])]:
            if path.endswith(".png"):
                run.log({f"figures/{Path(path).stem}": wandb.Image(path)})
        return run.dir
