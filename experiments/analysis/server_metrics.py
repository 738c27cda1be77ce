"""The engines' own view during a load: queue lengths and KV use over time, for every engine alike.

Each job's `server_metrics.parquet` (sampled from the server's Prometheus page while the load ran:
`experiments.sweep.launch.MetricsRecorder`) is keyed by canonical names, whatever the engine calls them:
`requests_running`, `requests_waiting` and either `kv_usage` (a fraction, vLLM / SGLang) or
`kv_blocks_used` / `kv_blocks_total` (this project's engines, one series per KV pool); this project's engines
add their iteration-time histogram (`iteration_time_sum_s`, `iterations`, by phase) and, semi-PD, the partition
(`partition_prefill_share`, `partition_decode_share`).
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any, Optional

import matplotlib.pyplot as plt
import pandas as pd
import seaborn as sns

from experiments.analysis.sweep_dir import job_dirs

_LABEL = re.compile(r'(\w+)="((?:[^"\\]|\\.)*)"')
# Histogram parts, differenced between samples rather than read as levels.
_ITERATION = ("iteration_time_sum_s", "iterations")


def _labels(text: Any) -> dict[str, str]:
    return dict(_LABEL.findall(text)) if isinstance(text, str) else {}


def _kv_usage(used: pd.Series, total: pd.Series) -> pd.Series:
    return used / total.where(total > 0)


def wide_series(frame: pd.DataFrame) -> pd.DataFrame:
    """One job's samples (server_metrics.parquet rows) -> one row per sample time (`time_s`, and `monotonic_s`
    when recorded): each metric summed over its label sets; `kv_usage` from the block counts where the engine
    gives no fraction; `iteration_time_s/<phase>`, the mean iteration time of each phase since the previous
    sample; and `<metric>/<instance>` wherever an engine has several instances (a disaggregated engine's
    prefill and decode pools), so that one instance's queue is not hidden in the total."""
    if frame.empty:
        return pd.DataFrame()
    df = frame.assign(instance=frame["labels"].map(lambda t: _labels(t).get("instance")),
                      phase=frame["labels"].map(lambda t: _labels(t).get("phase")))
    levels = df[~df["metric"].isin(_ITERATION)]
    wide = levels.groupby(["time_s", "metric"])["value"].sum().unstack("metric")
    wide.columns.name = None
    if "kv_usage" not in wide and {"kv_blocks_used", "kv_blocks_total"} <= set(wide.columns):
        wide["kv_usage"] = _kv_usage(wide["kv_blocks_used"], wide["kv_blocks_total"])
    parts = [wide]
    per = levels.dropna(subset=["instance"])
    per = per[per.groupby("metric")["instance"].transform("nunique") > 1]
    if not per.empty:
        inst = per.groupby(["time_s", "metric", "instance"])["value"].sum().unstack(["metric", "instance"])
        inst.columns = [f"{m}/{i}" for m, i in inst.columns]
        for i in per["instance"].unique():
            used, total = f"kv_blocks_used/{i}", f"kv_blocks_total/{i}"
            if used in inst and total in inst:
                inst[f"kv_usage/{i}"] = _kv_usage(inst[used], inst[total])
        parts.append(inst)
    it = df[df["metric"].isin(_ITERATION)]
    if set(it["metric"]) == set(_ITERATION):
        cum = it.assign(phase=it["phase"].fillna("all")).groupby(["time_s", "metric", "phase"])["value"].sum()
        cum = cum.unstack(["metric", "phase"]).sort_index()
        # A histogram's sum and count only grow: their increments are the iterations between two samples.
        d = cum.diff()
        for phase in cum["iterations"].columns:
            n = d["iterations"][phase]
            parts.append((d["iteration_time_sum_s"][phase] / n.where(n > 0)).rename(f"iteration_time_s/{phase}"))
    out = pd.concat(parts, axis=1).sort_index()
    if "monotonic_s" in df:
        out["monotonic_s"] = df.groupby("time_s")["monotonic_s"].first()
    return out.rename_axis("time_s").reset_index()


def _read_json(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text()) if path.is_file() else {}


def job_timeseries(job_dir: Path) -> Optional[pd.DataFrame]:
    """One job's server metrics over time (`wide_series`), `time_s` in seconds since its load started where the
    job recorded both clocks (before that, since sampling began: it then includes the step probe before the
    load); `clock` says which. None when the job sampled nothing. A simulated job's samples are its virtual engine's (time 0 = load start)."""
    f = Path(job_dir) / "server_metrics.parquet"
    if not f.is_file():
        return None
    wide = wide_series(pd.read_parquet(f))
    if wide.empty:
        return None
    t0 = _read_json(Path(job_dir) / "summary.json").get("t0_monotonic")
    if t0 is not None and "monotonic_s" in wide:
        wide["time_s"] = wide["monotonic_s"] - float(t0)
        wide["clock"] = "load"
    else:
        wide["clock"] = "sampling"
    return wide.drop(columns=["monotonic_s"], errors="ignore")


def iteration_means(job_dir: Path, start_s: float, end_s: float) -> dict[str, float]:
    """Mean iteration time per phase over the iterations that ended between `start_s` and `end_s` of the load's
    clock (differences of the cumulative histogram, so each iteration counts once: a mean over samples would
    weight the drain after the load, when batches are small, like the load itself). {} if nothing was sampled."""
    f = Path(job_dir) / "server_metrics.parquet"
    t0 = _read_json(Path(job_dir) / "summary.json").get("t0_monotonic")
    if not f.is_file() or t0 is None:
        return {}
    df = pd.read_parquet(f)
    df = df[df["metric"].isin(_ITERATION)]
    if df.empty or "monotonic_s" not in df:
        return {}
    df = df.assign(t=df["monotonic_s"] - float(t0), phase=df["labels"].map(lambda x: _labels(x).get("phase")))
    cum = df.groupby(["t", "metric", "phase"])["value"].sum().unstack(["metric", "phase"]).sort_index()
    cum = cum.ffill().fillna(0.0)  # a phase that has not run yet has no series: zero iterations so far
    window = cum[(cum.index >= start_s) & (cum.index <= end_s)]
    out = {}
    if len(window) >= 2:
        d = window.iloc[-1] - window.iloc[0]
        for phase in cum["iterations"].columns:
            n = d["iterations"][phase]
            if n > 0:
                out[phase] = float(d["iteration_time_sum_s"][phase] / n)
    return out


def server_timeseries(sweep_dir: Path) -> pd.DataFrame:
    """Every job's samples (`job_timeseries`), with the job's engine and rate."""
    frames = []
    for jd in job_dirs(Path(sweep_dir)):  # a single run's job is the run's own directory
        if not (jd / "server_metrics.parquet").is_file():
            continue
        job = json.loads((jd / "job.json").read_text())
        wide = job_timeseries(jd)
        if wide is not None:
            frames.append(wide.assign(engine=job["engine"], rate=job["rate"]))
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()


def server_metrics_figure(ts: pd.DataFrame):
    """Queue lengths and KV use against time, per engine, at the highest rate each engine ran."""
    top = ts[ts["rate"] == ts.groupby("engine")["rate"].transform("max")]
    panels = [c for c in ("requests_running", "requests_waiting", "kv_usage") if c in top]
    # The mean of the runs at that rate (seeds, or twins that differ only in their SLOs) at each sample time, taken
    # here: seaborn's own estimator (and its default bootstrap band) took seconds to minutes over a sweep's samples.
    top = top.groupby(["engine", "rate", "time_s"], as_index=False)[panels].mean()
    fig, axes = plt.subplots(len(panels), 1, figsize=(6.5, 2.0 * len(panels)), sharex=True, squeeze=False)
    labels = {"requests_running": "running requests", "requests_waiting": "waiting requests",
              "kv_usage": "KV cache in use (fraction)"}
    for ax, col in zip(axes[:, 0], panels):
        sns.lineplot(data=top, x="time_s", y=col, hue="engine", style="engine", ax=ax, legend=ax is axes[0, 0],
                     estimator=None)
        ax.set(ylabel=labels[col], xlabel="time from the start of the load (s)")
    if axes[0, 0].get_legend() is not None:
        sns.move_legend(axes[0, 0], "upper left", bbox_to_anchor=(1.01, 1.0), frameon=False)
    rates = ", ".join(f"{e} {r:g}" for e, r in top.groupby("engine")["rate"].first().items())
    fig.suptitle(f"Server-side queues and KV use (req/s: {rates})", fontsize=9)
    fig.tight_layout()
    return fig
