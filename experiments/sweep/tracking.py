"""Weights & Biases tracking: one run per job, one summary run per sweep.

Offline by default: runs are written under the job's directory and uploaded
later with `wandb sync <dir>/wandb/offline-run-*`. Nothing here waits on the
network; mode=disabled (the tests) skips W&B entirely.
"""

from __future__ import annotations

import logging
import os
from typing import Any, Optional

import pandas as pd

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


def _settings():
    import wandb

    # No console capture, no stats thread: quiet in job logs, nothing that can block.
    return wandb.Settings(console="off", x_disable_stats=True, init_timeout=120, silent=True)


def log_job(wcfg, job_dir: str, name: str, group: str, job_type: str, config: dict, summary: dict[str, Any],
            requests: Optional[pd.DataFrame]) -> Optional[str]:
    """Log one job; returns the run's local directory (None when disabled)."""
    if wcfg.mode == "disabled":
        return None
    import wandb

    os.environ.setdefault("WANDB_SILENT", "true")
    with wandb.init(project=wcfg.project, entity=wcfg.entity, mode=wcfg.mode, dir=job_dir, name=name,
                    group=group, job_type=job_type, config=config, tags=list(wcfg.tags), settings=_settings(),
                    reinit="create_new") as run:
        run.summary.update(flatten(summary))
        if requests is not None and len(requests):
            cols = [c for c in requests.columns if c not in ("token_times_s", "itl_s")]
            run.log({"requests": wandb.Table(dataframe=requests[cols].astype(object).where(requests[cols].notna(),
                                                                                           None))})
        return run.dir


def log_sweep(wcfg, sweep_dir: str, summary: pd.DataFrame, figures: list[str]) -> Optional[str]:
    """One summary run per sweep: the aggregate table and the figures."""
    if wcfg.mode == "disabled":
        return None
    import wandb

    os.environ.setdefault("WANDB_SILENT", "true")
    name = os.path.basename(os.path.normpath(sweep_dir))
    with wandb.init(project=wcfg.project, entity=wcfg.entity, mode=wcfg.mode, dir=sweep_dir, name=f"{name}-summary",
                    group=name, job_type="sweep-summary", tags=list(wcfg.tags), settings=_settings(),
                    reinit="create_new") as run:
        table = summary.drop(columns=[c for c in ("traceback",) if c in summary.columns])
        run.log({"summary": wandb.Table(dataframe=table.astype(str))})
        for path in figures:
            if path.endswith(".png"):
                run.log({os.path.splitext(os.path.basename(path))[0]: wandb.Image(path)})
        return run.dir
