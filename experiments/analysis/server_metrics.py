"""The engines' own view during a load: queue lengths and KV use over time, for every engine alike.

Each job's `server_metrics.parquet` (sampled from the server's Prometheus page while the load ran:
`experiments.sweep.launch.MetricsRecorder`) is keyed by canonical names, whatever the engine calls them:
`requests_running`, `requests_waiting` and either `kv_usage` (a fraction, vLLM / SGLang) or
`kv_blocks_used` / `kv_blocks_total` (this project's engines, one series per KV pool).
"""

from __future__ import annotations

import json
from pathlib import Path

import matplotlib.pyplot as plt
import pandas as pd
import seaborn as sns


def server_timeseries(sweep_dir: Path) -> pd.DataFrame:
    """Every job's samples, summed over label sets per time and metric, with the job's engine and rate."""
    frames = []
    for f in sorted(Path(sweep_dir).glob("*/server_metrics.parquet")):
        job = json.loads((f.parent / "job.json").read_text())
        df = pd.read_parquet(f)
        df = df.groupby(["time_s", "metric"], as_index=False)["value"].sum()
        wide = df.pivot(index="time_s", columns="metric", values="value").reset_index()
        if "kv_usage" not in wide and {"kv_blocks_used", "kv_blocks_total"} <= set(wide.columns):
            wide["kv_usage"] = wide["kv_blocks_used"] / wide["kv_blocks_total"]
        frames.append(wide.assign(engine=job["engine"], rate=job["rate"]))
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()


def server_metrics_figure(ts: pd.DataFrame):
    """Queue lengths and KV use against time, per engine, at the highest rate each engine ran."""
    top = ts[ts["rate"] == ts.groupby("engine")["rate"].transform("max")]
    panels = [c for c in ("requests_running", "requests_waiting", "kv_usage") if c in top]
    fig, axes = plt.subplots(len(panels), 1, figsize=(6.5, 2.0 * len(panels)), sharex=True, squeeze=False)
    labels = {"requests_running": "running requests", "requests_waiting": "waiting requests",
              "kv_usage": "KV cache in use (fraction)"}
    for ax, col in zip(axes[:, 0], panels):
        sns.lineplot(data=top, x="time_s", y=col, hue="engine", style="engine", ax=ax, legend=ax is axes[0, 0])
        ax.set(ylabel=labels[col], xlabel="time from the start of the load (s)")
    if axes[0, 0].get_legend() is not None:
        sns.move_legend(axes[0, 0], "upper left", bbox_to_anchor=(1.01, 1.0), frameon=False)
    rates = ", ".join(f"{e} {r:g}" for e, r in top.groupby("engine")["rate"].first().items())
    fig.suptitle(f"Server-side queues and KV use (req/s: {rates})", fontsize=9)
    fig.tight_layout()
    return fig
