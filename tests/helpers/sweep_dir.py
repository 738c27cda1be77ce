"""Synthetic sweep directories, laid out as `python run.py -m` writes them, for aggregation and figure tests."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Optional

import pandas as pd


def write_job(sweep_dir: Path, name: str, engine: str, rate: float, *, ttft_s: list[float] = (),
              tpot_s: Optional[list[float]] = None, slo: tuple[float, float] = (1.0, 0.1),
              overrides: Optional[dict[str, str]] = None, config: Optional[dict[str, Any]] = None,
              status: str = "ok", **headline) -> Path:
    """One job directory: job.json, provenance.json (`config` as its resolved config) and, for a job with
    requests, requests.parquet with one row per TTFT given (no errors; TPOT defaults to a tenth of the SLO)."""
    jd = Path(sweep_dir) / name
    jd.mkdir(parents=True)
    job = {"status": status, "engine": engine, "rate": rate, "workload": "synthetic", "model": "tiny",
           "mode": "single", "overrides": overrides or {"engine": engine, "workload.rate": str(rate)},
           "started": 0.0, "finished": 1.0, "slo": {"ttft_s": slo[0], "tpot_s": slo[1], "scale": None}, **headline}
    if status != "ok":
        job.update(error="ServerStartError: boom", traceback="Traceback (most recent call last): ...")
    (jd / "job.json").write_text(json.dumps(job))
    (jd / "provenance.json").write_text(json.dumps({"git_commit": "0" * 40, "config": config}))
    if ttft_s:
        n = len(ttft_s)
        pd.DataFrame({"request_id": range(n), "ttft_s": list(ttft_s),
                      "tpot_s": tpot_s if tpot_s is not None else [slo[1] / 10] * n,
                      "output_tokens": [8] * n, "error": [None] * n}).to_parquet(jd / "requests.parquet")
    return jd
