"""Paper figures from saved results alone (seaborn).

    python -m experiments.figures <sweep dir>

Reads the sweep's summary.csv and requests.parquet (aggregating the job
folders first when they are missing) and writes figures/*.png and *.pdf:
SLO attainment vs rate, P90 TTFT and TPOT vs rate, mean E2E vs rate, goodput
per engine, SLO-scale curves, and the partition over time where jobs logged one.
The SLO-scale grid is the sweep's `experiment.slo_scales`, read from the
resolved config its jobs saved (provenance.json).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402
import seaborn as sns  # noqa: E402

from experiments.analysis.server_metrics import server_metrics_figure, server_timeseries  # noqa: E402


def _save(fig, out: Path, name: str) -> list[str]:
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for ext in ("png", "pdf"):
        p = out / f"{name}.{ext}"
        fig.savefig(p, bbox_inches="tight", dpi=150)
        paths.append(str(p))
    plt.close(fig)
    return paths


def goodput_from_curve(points: pd.DataFrame, target: float = 0.9) -> float:
    """Highest rate with attainment >= target, interpolating between measured rates."""
    pts = points.sort_values("rate")[["rate", "slo_attainment"]].to_numpy()
    best = 0.0
    for i, (r, a) in enumerate(pts):
        if a >= target:
            best = r
            if i + 1 < len(pts) and pts[i + 1][1] < target:
                r2, a2 = pts[i + 1]
                best = r + (a - target) / (a - a2) * (r2 - r)
    return float(best)


def slo_scales(sweep_dir: str | Path) -> list[float]:
    """`experiment.slo_scales` of the sweep's jobs (their saved resolved config; the union if they differ),
    or the schema's default when no job saved one."""
    from experiments.sweep.aggregate import job_dirs
    from experiments.sweep.config import ExperimentConfig

    grids = []
    for jd in job_dirs(Path(sweep_dir)):
        prov = jd / "provenance.json"
        config = json.loads(prov.read_text()).get("config") if prov.is_file() else None
        grid = ((config or {}).get("experiment") or {}).get("slo_scales")
        if grid is not None:
            grids.append(grid)
    if not grids:
        return list(ExperimentConfig().slo_scales)
    return sorted({float(s) for grid in grids for s in grid})


def slo_scale_curves(requests: pd.DataFrame, scales: list[float]) -> pd.DataFrame:
    """Attainment of each (engine, rate) with both of its SLOs multiplied by each scale."""
    ok = requests[requests["status"] == "ok"] if "status" in requests else requests
    rows = []
    for (engine, rate), g in ok.groupby(["engine", "rate"]):
        base_ttft, base_tpot = g["slo_ttft_s"].iloc[0], g["slo_tpot_s"].iloc[0]
        for s in scales:
            met = g["error"].isna() & (g["ttft_s"] <= s * base_ttft) & (g["tpot_s"].isna() | (g["tpot_s"] <= s * base_tpot))
            rows.append({"engine": engine, "rate": rate, "slo_scale": s, "slo_attainment": float(met.mean())})
    return pd.DataFrame(rows)


def make_figures(sweep_dir: str | Path) -> list[str]:
    sweep_dir = Path(sweep_dir)
    out = sweep_dir / "figures"
    if not (sweep_dir / "summary.csv").is_file():
        from experiments.sweep.aggregate import aggregate_sweep

        aggregate_sweep(sweep_dir)
    summary = pd.read_csv(sweep_dir / "summary.csv")
    req_path = sweep_dir / "requests.parquet"
    requests = pd.read_parquet(req_path) if req_path.is_file() else pd.DataFrame()
    ok = summary[summary["status"] == "ok"] if "status" in summary else summary
    sns.set_theme(style="whitegrid", context="paper")
    paths: list[str] = []
    if ok.empty:
        return paths
    single = "goodput_rate" not in ok or ok["goodput_rate"].isna().all()
    if single:
        fig, ax = plt.subplots(figsize=(4.5, 3.2))
        sns.lineplot(data=ok, x="rate", y="slo_attainment", hue="engine", marker="o", ax=ax)
        ax.axhline(0.9, ls="--", c="grey", lw=0.8)
        ax.set(xlabel="request rate (req/s)", ylabel="SLO attainment", ylim=(-0.02, 1.02))
        paths += _save(fig, out, "slo_attainment_vs_rate")

        fig, axes = plt.subplots(1, 2, figsize=(8.5, 3.2))
        for ax, col, label in zip(axes, ("p90_ttft_s", "p90_tpot_s"), ("P90 TTFT (s)", "P90 TPOT (s)")):
            sns.lineplot(data=ok, x="rate", y=col, hue="engine", marker="o", ax=ax)
            ax.set(xlabel="request rate (req/s)", ylabel=label)
        paths += _save(fig, out, "p90_latency_vs_rate")

        fig, ax = plt.subplots(figsize=(4.5, 3.2))
        sns.lineplot(data=ok, x="rate", y="mean_e2e_s", hue="engine", marker="o", ax=ax)
        ax.set(xlabel="request rate (req/s)", ylabel="mean E2E latency (s)")
        paths += _save(fig, out, "mean_e2e_vs_rate")

        gp = pd.DataFrame([{"engine": e, "goodput": goodput_from_curve(g)} for e, g in ok.groupby("engine")])
    else:
        gp = ok.groupby("engine", as_index=False)["goodput_rate"].mean().rename(columns={"goodput_rate": "goodput"})
    fig, ax = plt.subplots(figsize=(4.5, 3.2))
    sns.barplot(data=gp, x="engine", y="goodput", hue="engine", ax=ax)
    ax.set(ylabel="goodput (req/s at >=90% SLO attainment)", xlabel="")
    paths += _save(fig, out, "goodput_per_engine")

    if not requests.empty and {"slo_ttft_s", "slo_tpot_s"} <= set(requests.columns):
        curves = slo_scale_curves(requests, slo_scales(sweep_dir))
        if not curves.empty:
            fig, ax = plt.subplots(figsize=(4.5, 3.2))
            sns.lineplot(data=curves, x="slo_scale", y="slo_attainment", hue="engine",
                         style="rate" if curves["rate"].nunique() > 1 else None, marker="o", ax=ax)
            ax.axhline(0.9, ls="--", c="grey", lw=0.8)
            ax.set(xlabel="SLO scale (x both SLOs)", ylabel="SLO attainment", ylim=(-0.02, 1.02))
            paths += _save(fig, out, "slo_attainment_vs_slo_scale")

    timeline = partition_timeline(sweep_dir)
    if not timeline.empty:
        paths += _save(partition_figure(timeline), out, "partition_over_time")
    series = server_timeseries(sweep_dir)
    if not series.empty:
        paths += _save(server_metrics_figure(series), out, "server_queues_and_kv_over_time")
    return paths


def partition_timeline(sweep_dir: Path) -> pd.DataFrame:
    """Partition decisions that semi-PD jobs log in <job>/partition_log.jsonl (one row per window)."""
    rows = []
    for f in sorted(Path(sweep_dir).rglob("partition_log.jsonl")):
        job = str(f.parent.relative_to(sweep_dir))
        for line in f.read_text().splitlines():
            d = json.loads(line)
            rows.append({"job": job, "time_s": d["time_s"], "prefill": d["prefill_share"],
                         "decode": d["decode_share"], "rate": d.get("rate")})
    return pd.DataFrame(rows)


def partition_figure(timeline: pd.DataFrame):
    """One panel per job: both shares over time (steps), the arrival rate of each window behind them."""
    jobs = list(dict.fromkeys(timeline["job"]))
    cols = min(2, len(jobs))
    rows = (len(jobs) + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(5.5 * cols, 2.6 * rows), squeeze=False, sharex=True)
    for ax, job in zip(axes.flat, jobs):
        g = timeline[timeline["job"] == job]
        ax.step(g["time_s"], g["prefill"], where="post", label="prefill share", lw=2)
        ax.step(g["time_s"], g["decode"], where="post", label="decode share", lw=2, ls="--")
        ax.set(ylim=(0, 105), ylabel="share (%)", title=job.replace(",", ", "))
        ax.title.set_fontsize(7)
        if g["rate"].notna().any():
            ax2 = ax.twinx()
            # A decision closes its window: the window's arrival rate is drawn to its left.
            ax2.bar(g["time_s"], g["rate"].fillna(0), width=-0.9 * g["time_s"].diff().median(), alpha=0.2,
                    color="grey", align="edge", label="arrivals (req/s)")
            ax2.set_ylabel("arrivals (req/s)", fontsize=7)
            ax2.grid(False)
    for ax in axes.flat[len(jobs):]:
        ax.set_visible(False)
    axes.flat[0].legend(fontsize=7, loc="lower left")
    for ax in axes[-1]:
        ax.set_xlabel("time since engine start (s)")
    fig.tight_layout()
    return fig


def main() -> None:
    if len(sys.argv) != 2 or not Path(sys.argv[1]).is_dir():
        print("usage: python -m experiments.figures <sweep dir>", file=sys.stderr)
        sys.exit(2)
    for p in make_figures(sys.argv[1]):
        print(p)


if __name__ == "__main__":
    main()
