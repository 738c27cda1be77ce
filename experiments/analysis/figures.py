"""Paper figures from saved results alone (matplotlib, seaborn's theme).

    python -m experiments.figures <sweep dir>

Reads the sweep's summary.csv and requests.parquet (aggregating the job folders first when they are missing)
and writes figures/*.png and *.pdf: SLO attainment, P90 TTFT and TPOT, and mean E2E against the request rate,
goodput per engine, SLO-scale curves, and the partition over time where jobs logged one.

What every figure does so that a reader can trust it:
- the caption names model, workload, backend / hardware and SLOs, and how many requests and seeds stand
  behind each point;
- points pool the valid runs of each configuration over seeds, with 95% intervals (bands) over requests and
  seeds (experiments/analysis/uncertainty.py); runs that failed validity (client self-check, host
  interference, incomplete) are left out of the lines and drawn as grey crosses, with a count in the caption;
  a point whose run did not reach steady state (its backlog still grew: request_metrics.steady_state) is drawn
  hollow, with a legend entry: its value depends on how long the run lasted;
- each engine has its own colour, marker and line style, and engines are nudged apart on the x axis so that
  overlapping curves (three engines at 100%) stay visible; legends sit outside the data;
- latency panels draw the SLO, use milliseconds for sub-second values and a log scale where values span
  decades;
- goodput follows the rule in experiments/analysis/points.py and says when it is a lower bound (the top of
  the tested range passed) or when attainment was not monotone in rate.
The SLO-scale grid is the sweep's `experiment.slo_scales`, read from the resolved config its jobs saved.
"""

from __future__ import annotations

import json
import math
import sys
import textwrap
from pathlib import Path
from typing import Any, Optional

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import seaborn as sns  # noqa: E402
from matplotlib.ticker import FixedFormatter, FixedLocator  # noqa: E402

from experiments.analysis import points as P  # noqa: E402
from experiments.analysis import request_metrics as M  # noqa: E402
from experiments.analysis import uncertainty as U  # noqa: E402
from experiments.analysis.server_metrics import job_timeseries, server_metrics_figure, server_timeseries  # noqa: E402
from experiments.analysis.sweep_dir import PER_TOKEN, job_dirs  # noqa: E402

ENGINE_ORDER = ["unified", "unified_chunked", "unified_splitfuse", "disagg", "semipd", "semipd_uncapped",
                "semipd_dynamic"]
MARKERS = ["o", "s", "^", "D", "v", "P", "X", "<", ">", "h"]
LINESTYLES = ["-", "--", "-.", ":", (0, (5, 1)), (0, (3, 1, 1, 1, 1, 1)), (0, (1, 1))]
INVALID_STYLE = dict(marker="x", color="0.45", s=36, linewidths=1.2, zorder=5, gid="invalid")


def goodput_from_curve(points: pd.DataFrame, target: float = 0.9) -> float:
    """Goodput of one curve by the rule of experiments.analysis.points.goodput_from_curve."""
    return P.goodput_from_curve(points["rate"], points["slo_attainment"], target)["goodput_rate"]


def _save(fig, out: Path, name: str) -> list[str]:
    """The figure as PNG and PDF, laid out and measured once for both: `bbox_inches="tight"` costs an extra draw
    per file and a constrained layout is solved at every draw (half a sweep's figure time went there)."""
    out.mkdir(parents=True, exist_ok=True)
    fig.draw_without_rendering()
    fig.set_layout_engine("none")  # the positions just computed, kept for both files
    _freeze_ticks(fig)
    bbox = fig.get_tightbbox().padded(plt.rcParams["savefig.pad_inches"])
    paths = []
    for ext in ("png", "pdf"):
        p = out / f"{name}.{ext}"
        fig.savefig(p, bbox_inches=bbox, dpi=150)
        paths.append(str(p))
    plt.close(fig)
    return paths


def _freeze_ticks(fig) -> None:
    """Every axis' ticks and labels as the layout's draw placed them, fixed: the bounding box and each file draw
    the figure again, and finding and formatting the ticks of every axis anew was ~15% of each draw. The same
    ticks, labels and offset text (tested: identical PNG)."""
    for ax in fig.get_axes():
        for axis in (ax.xaxis, ax.yaxis):
            for ticker in (axis.major, axis.minor):
                try:
                    locs = list(ticker.locator())
                    fmt = ticker.formatter
                    fixed = FixedFormatter(fmt.format_ticks(locs))
                    fixed.set_offset_string(fmt.get_offset())
                except Exception:  # a locator or formatter that cannot say now: left as it is
                    continue
                locator = FixedLocator(locs)
                locator.set_axis(axis)
                fixed.set_axis(axis)
                ticker.locator, ticker.formatter = locator, fixed


# -- reading a sweep -------------------------------------------------------------------------------------------


def slo_scales(sweep_dir: str | Path) -> list[float]:
    """`experiment.slo_scales` of the sweep's jobs (their saved resolved config; the union if they differ),
    or the schema's default when no job saved one."""
    from experiments.sweep.config import ExperimentConfig

    grids = []
    for config in _configs(sweep_dir):
        grid = ((config or {}).get("experiment") or {}).get("slo_scales")
        if grid is not None:
            grids.append(grid)
    if not grids:
        return list(ExperimentConfig().slo_scales)
    return sorted({float(s) for grid in grids for s in grid})


def _configs(sweep_dir) -> list[Optional[dict]]:
    return [p.get("config") for p in _provenances(sweep_dir)]


def _provenances(sweep_dir) -> list[dict]:
    out = []
    for jd in job_dirs(Path(sweep_dir)):
        prov = jd / "provenance.json"
        out.append(json.loads(prov.read_text()) if prov.is_file() else {})
    return out


def _swept(sweep_dir: Path, summary: pd.DataFrame) -> list[str]:
    f = sweep_dir / "sweep.json"
    if f.is_file():
        return json.loads(f.read_text()).get("swept", [])
    return [c for c in summary.columns if "." in c and not c.startswith("slo_")] + \
        [c for c in ("engine", "slo") if c in summary.columns]


def context(sweep_dir: Path, summary: pd.DataFrame, pts: Optional[pd.DataFrame] = None) -> str:
    """Caption: model, workload, backend / hardware, SLOs, requests and seeds per point."""
    provs = _provenances(sweep_dir)
    cfg = next((p.get("config") for p in provs if p.get("config")), None) or {}
    machine = next((p.get("machine") for p in provs if p.get("machine")), None) or {}

    def uniq(col):
        vals = sorted({str(v) for v in summary[col].dropna()}) if col in summary else []
        return ", ".join(vals)

    model = uniq("model") or (cfg.get("model") or {}).get("name", "?")
    workload = uniq("workload") or (cfg.get("workload") or {}).get("name", "?")
    w = cfg.get("workload") or {}
    # The scale the jobs ran at (a time budget may have shortened the requests), else the configured one.
    run_scales = sorted(set(summary["length_scale"].dropna())) if "length_scale" in summary else []
    ls = run_scales[0] if len(run_scales) == 1 else w.get("length_scale", 1.0)
    if w.get("name") in ("synthetic", "longbench_synthetic", "shift") and w.get("prompt_mean"):
        workload += f" (mean prompt {w['prompt_mean'] * ls:.0f} / output {w['output_mean'] * ls:.0f} tokens)"
    elif ls != 1.0:
        workload += f" (lengths x{ls:g})"
    backends = set(summary["backend"].dropna()) if "backend" in summary else {"real"}
    if backends == {"sim"}:
        hw = uniq("hardware") or "?"
        where = f"simulated on {hw}"
    else:
        cores = summary["cores"].dropna().astype(str).iloc[0] if "cores" in summary and summary["cores"].notna().any() \
            else None
        n = len(cores.split(",")) if cores else machine.get("cores")
        where = "real engines on CPU" + (f", {n} core(s)" if n else "") + (f" of {machine['cpu']}" if machine.get("cpu")
                                                                          else "")
    parts = [f"model {model}", f"workload {workload}", where]
    if {"slo_ttft_s", "slo_tpot_s"} <= set(summary.columns):
        slos = summary[["slo_ttft_s", "slo_tpot_s"]].dropna().drop_duplicates()
        if len(slos) == 1:
            t, p = slos.iloc[0]
            defs = set(summary["slo_tpot_definition"].dropna()) if "slo_tpot_definition" in summary else set()
            tpot = f"TPOT ({defs.pop()})" if len(defs) == 1 and defs != {"mean"} else "TPOT"
            parts.append(f"SLO TTFT <= {_fmt_s(t)}, {tpot} <= {_fmt_s(p)}")
        elif len(slos) > 1:
            parts.append("SLOs per panel")
    line2 = []
    if pts is not None and not pts.empty and "n_requests" in pts:
        nreq = pts.loc[pts["valid"], "n_requests"] if pts["valid"].any() else pts["n_requests"]
        seeds = pts.loc[pts["valid"], "n_seeds"] if pts["valid"].any() else pts["n_seeds"]
        rng = f"{int(nreq.min())}" if nreq.min() == nreq.max() else f"{int(nreq.min())}-{int(nreq.max())}"
        sd = f"{int(seeds.min())}" if seeds.min() == seeds.max() else f"{int(seeds.min())}-{int(seeds.max())}"
        line2.append(f"{rng} measured requests x {sd} seed(s) per point; bars: 95% intervals")
    return "; ".join(parts) + ("\n" + "; ".join(line2) if line2 else "")


def _fmt_s(x: float) -> str:
    return f"{x * 1e3:.3g} ms" if x < 1 else f"{x:.3g} s"


# -- styling ---------------------------------------------------------------------------------------------------


def engine_styles(engines) -> dict[str, dict[str, Any]]:
    known = [e for e in ENGINE_ORDER if e in set(engines)]
    ordered = known + sorted(set(engines) - set(known))
    palette = sns.color_palette("colorblind", max(len(ordered), 3))
    return {e: {"color": palette[i % len(palette)], "marker": MARKERS[i % len(MARKERS)],
                "ls": LINESTYLES[i % len(LINESTYLES)], "order": i, "n": len(ordered)} for i, e in enumerate(ordered)}


def _dodge(rates: np.ndarray, style: dict) -> np.ndarray:
    """Nudge each engine's x a little (a fraction of the smallest rate gap) so that equal values stay visible."""
    return rates + (style["order"] - (style["n"] - 1) / 2) * style.get("dx", 0.0)


def _set_dx(styles: dict, rates) -> None:
    r = np.unique(np.asarray(rates, dtype=float))
    gap = np.min(np.diff(r)) if r.size > 1 else max(r.max() if r.size else 1.0, 1.0)
    for st in styles.values():
        st["dx"] = 0.12 * gap / max(st["n"], 1)


def _panels(pts: pd.DataFrame) -> list[tuple[str, pd.DataFrame]]:
    """Facets: one per combination of the point keys other than engine and rate (e.g. slo=tight / loose)."""
    keys = [k for k in pts.attrs.get("keys", ["engine", "rate"]) if k not in ("engine", "rate")
            and pts[k].nunique(dropna=False) > 1]
    if not keys:
        return [("", pts)]
    out = []
    for key, g in pts.groupby(keys, dropna=False, sort=True):
        key = key if isinstance(key, tuple) else (key,)
        out.append((", ".join(f"{k}={v}" for k, v in zip(keys, key)), g))
    return out


def _unsteady(g: pd.DataFrame) -> np.ndarray:
    """Points whose run did not reach steady state (False only where the column says so)."""
    if "steady_state" not in g:
        return np.zeros(len(g), dtype=bool)
    return g["steady_state"].map(lambda v: v is False or str(v) == "False").to_numpy(dtype=bool)


def _line(ax, g: pd.DataFrame, col: str, style: dict, scale: float, label: Optional[str]) -> int:
    """The engine's valid points joined by its line, broken where a point is invalid (NaN rows), with its 95%
    intervals as bars (and as a band when few engines share the panel); a point without steady state hollow.
    Returns how many are hollow."""
    g = g.sort_values("rate")
    x = _dodge(g["rate"].to_numpy(dtype=float), style)
    y = np.where(g["valid"].to_numpy(dtype=bool), g[col].to_numpy(dtype=float), np.nan) * scale
    hollow = _unsteady(g) & np.isfinite(y)
    ax.plot(x, y, marker=style["marker"], ls=style["ls"], color=style["color"], label=label, ms=5, lw=1.4,
            markeredgecolor="white", markeredgewidth=0.5, zorder=3, markevery=list(np.flatnonzero(~hollow)))
    if hollow.any():
        ax.scatter(x[hollow], y[hollow], marker=style["marker"], facecolors="white", edgecolors=style["color"],
                   s=30, linewidths=1.2, zorder=4, gid="unsteady")
    lo, hi = f"{col}_ci_low", f"{col}_ci_high"
    if lo in g and hi in g:
        ylo = g[lo].to_numpy(dtype=float) * scale
        yhi = g[hi].to_numpy(dtype=float) * scale
        finite_hi = np.where(np.isinf(yhi), np.nan, yhi)
        if style["n"] <= 2:
            ax.fill_between(x, np.where(np.isnan(y), np.nan, ylo), np.where(np.isnan(y), np.nan, finite_hi),
                            color=style["color"], alpha=0.15, lw=0, zorder=2)
        ax.errorbar(x, y, yerr=[np.clip(y - ylo, 0, None), np.clip(np.nan_to_num(finite_hi - y, nan=0.0), 0, None)],
                    fmt="none", ecolor=style["color"], elinewidth=0.8, capsize=2, alpha=0.8, zorder=2)
        unbounded = np.isinf(yhi)
        if unbounded.any():  # an interval the sample cannot close (P99 of few requests): an arrow up
            ax.scatter(x[unbounded], y[unbounded], marker=r"$\uparrow$", color=style["color"], s=40, zorder=4)
    return int(hollow.sum())


def _invalid(ax, g: pd.DataFrame, col: str, style: dict, scale: float) -> int:
    bad = g[~g["valid"]]
    if bad.empty or col not in bad:
        return 0
    ax.scatter(_dodge(bad["rate"].to_numpy(dtype=float), style), bad[col].to_numpy(dtype=float) * scale,
               **INVALID_STYLE)
    return len(bad)


def _latency_scale(values: pd.Series) -> tuple[float, str]:
    v = values.replace([np.inf, -np.inf], np.nan).dropna()
    return (1e3, "ms") if v.empty or v.max() < 1.0 else (1.0, "s")


def _maybe_log(ax, values: np.ndarray) -> None:
    v = values[np.isfinite(values) & (values > 0)]
    if v.size and v.max() / v.min() > 30:
        ax.set_yscale("log")


def _legend(fig, styles: dict, extra: list = (), title: str = "engine") -> None:
    handles = [plt.Line2D([], [], color=s["color"], marker=s["marker"], ls=s["ls"], label=e)
               for e, s in sorted(styles.items(), key=lambda kv: kv[1]["order"])]
    handles += list(extra)
    fig.legend(handles=handles, loc="center left", bbox_to_anchor=(1.0, 0.5), frameon=False, fontsize=8,
               title=title, title_fontsize=8)


def _wrap(text: str, width: int = 110) -> str:
    return "\n".join(textwrap.fill(line, width) for line in text.split("\n"))


def _caption(fig, text: str, invalid: int, total: int) -> None:
    if total and invalid:
        text += f"\n{invalid} of {total} point(s) have no valid run: drawn as grey x, not joined"
    fig.suptitle(_wrap(text), fontsize=7.5, y=1.0, va="bottom")


def _invalid_handle():
    return plt.Line2D([], [], marker="x", color="0.45", ls="none", label="invalid (not in lines)")


def _unsteady_handle():
    return plt.Line2D([], [], marker="o", color="0.3", markerfacecolor="white", ls="none",
                      label="no steady state (backlog still growing)")


# -- rate-sweep figures ----------------------------------------------------------------------------------------


def _vs_rate(pts: pd.DataFrame, specs: list[dict], caption: str, target: Optional[float] = None):
    """One row of panels per facet, one column per metric."""
    facets = _panels(pts)
    styles = engine_styles(pts["engine"].unique())
    _set_dx(styles, pts["rate"])
    fig, axes = plt.subplots(len(facets), len(specs), figsize=(3.6 * len(specs), 2.9 * len(facets)), squeeze=False)
    n_invalid = n_unsteady = 0
    for row, (title, g) in zip(axes, facets):
        for ax, spec in zip(row, specs):
            col = spec["col"]
            if spec.get("latency"):
                scale, unit = _latency_scale(pts[[col, f"{col}_ci_low"]].stack() if f"{col}_ci_low" in pts
                                             else pts[col])
            else:
                scale, unit = spec.get("scale", 1.0), spec.get("unit", "")
            for engine, ge in g.groupby("engine"):
                st = styles[engine]
                if ge["valid"].any():
                    n_unsteady += _line(ax, ge, col, st, scale, engine)
                if spec is specs[0]:
                    n_invalid += _invalid(ax, ge, col, st, scale)
                else:
                    _invalid(ax, ge, col, st, scale)
            if spec.get("slo_col") and spec["slo_col"] in g and g[spec["slo_col"]].notna().any():
                slo = float(g[spec["slo_col"]].dropna().iloc[0]) * scale
                ax.axhline(slo, color="crimson", ls=(0, (4, 2)), lw=1.0, zorder=1)
                ax.annotate(f"SLO {slo:.3g} {unit}", (0.01, slo), xycoords=("axes fraction", "data"), fontsize=7,
                            color="crimson", va="bottom")
            if target is not None and spec.get("target"):
                ax.axhline(target * scale, color="0.3", ls=":", lw=1.0, zorder=1)
                ax.annotate(f"target {target * scale:.0f}{unit}", (0.01, target * scale),
                            xycoords=("axes fraction", "data"), fontsize=7, color="0.3", va="top")
            if spec.get("ylim"):
                ax.set_ylim(*spec["ylim"])
            elif spec.get("latency") or spec.get("log_ok"):
                _maybe_log(ax, (g[col].to_numpy(dtype=float) * scale))
            ax.set_xlabel("request rate (req/s)")
            ax.set_ylabel(spec["label"] + (f" ({unit})" if unit and unit != "%" else " (%)" if unit == "%" else ""))
            ax.set_xticks(sorted(pts["rate"].unique()))
            if title:
                ax.set_title(title, fontsize=8)
    _legend(fig, styles, ([_invalid_handle()] if n_invalid else []) + ([_unsteady_handle()] if n_unsteady else []))
    fig.tight_layout()
    _caption(fig, caption, n_invalid, len(pts))
    return fig


def attainment_figure(pts: pd.DataFrame, caption: str, target: float = 0.9):
    return _vs_rate(pts, [{"col": "slo_attainment", "label": "SLO attainment", "scale": 100, "unit": "%",
                           "ylim": (-3, 103), "target": True}], caption, target)


def latency_figure(pts: pd.DataFrame, caption: str):
    return _vs_rate(pts, [{"col": "p90_ttft_s", "label": "P90 TTFT", "latency": True, "slo_col": "slo_ttft_s"},
                          {"col": "p90_tpot_s", "label": "P90 TPOT", "latency": True, "slo_col": "slo_tpot_s"}],
                    caption)


def e2e_figure(pts: pd.DataFrame, caption: str):
    return _vs_rate(pts, [{"col": "mean_e2e_s", "label": "mean E2E latency", "latency": True}], caption)


def g_low(r) -> float:
    """The lowest rate tested on a curve (what a goodput below the range is below)."""
    return float(r.get("goodput_low_rate", 0.0) or 0.0)


def goodput_figure(gp: pd.DataFrame, caption: str, target: float):
    facets = [("", gp)]
    keys = [k for k in gp.columns if "." in k or k == "slo"]
    keys = [k for k in keys if k in gp and gp[k].nunique(dropna=False) > 1]
    if keys:
        facets = [(", ".join(f"{k}={v}" for k, v in zip(keys, key if isinstance(key, tuple) else (key,))), g)
                  for key, g in gp.groupby(keys, dropna=False)]
    styles = engine_styles(gp["engine"].unique())
    fig, axes = plt.subplots(1, len(facets), figsize=(max(3.2, 0.9 * gp["engine"].nunique() + 1.5) * len(facets), 3.2),
                             squeeze=False)
    notes = set()
    for ax, (title, g) in zip(axes[0], facets):
        g = g.assign(_o=g["engine"].map(lambda e: styles[e]["order"])).sort_values("_o")
        x = np.arange(len(g))
        for i, (_, r) in enumerate(g.iterrows()):
            st = styles[r["engine"]]
            top = bool(r.get("goodput_at_range_top") is True or r.get("goodput_at_range_top") == 1)
            bottom = bool(r.get("goodput_at_range_bottom") is True or r.get("goodput_at_range_bottom") == 1)
            mono = not (r.get("goodput_monotone") is False or r.get("goodput_monotone") == 0)
            ax.bar(i, r["goodput_rate"], color=st["color"], hatch="//" if top else None, edgecolor="white" if not top
                   else "0.2", lw=0.5)
            lo, hi = r.get("goodput_ci_low"), r.get("goodput_ci_high")
            if lo is not None and hi is not None and pd.notna(lo) and pd.notna(hi):
                ax.errorbar(i, r["goodput_rate"], yerr=[[max(0, r["goodput_rate"] - lo)], [max(0, hi - r["goodput_rate"])]],
                            fmt="none", ecolor="0.15", capsize=3, lw=1)
            gaps = int(r.get("goodput_invalid_points", 0) or 0)
            label = ("≥" if top else "<" if bottom else "") + (f"{r['goodput_rate']:.2g}" if not bottom else
                                                              f"{g_low(r):g}") + ("*" if not mono else "") \
                + ("†" if gaps else "")
            if bottom:
                notes.add("<: even the lowest tested rate missed the target")
            if gaps:
                notes.add("†: read across rates whose runs were invalid")
            ax.annotate(label, (i, 0), xytext=(0, 4), textcoords="offset points", ha="center", va="bottom",
                        fontsize=8, color="white", fontweight="bold")  # inside the bar, clear of the interval
            if top:
                notes.add("hatched, ≥: every tested rate passed, goodput is at least the top rate")
            if not mono:
                notes.add("*: attainment not monotone in rate (a lower rate failed)")
        ax.set_xticks(x, g["engine"], rotation=30, ha="right", fontsize=8)
        ax.set_ylabel(f"goodput (req/s at >= {target:.0%} attainment)", fontsize=8)
        ax.set_xlabel("")
        if title:
            ax.set_title(title, fontsize=8)
        ax.margins(y=0.15)
    text = caption + ("\n" + "; ".join(sorted(notes)) if notes else "")
    fig.tight_layout()
    fig.suptitle(_wrap(text, 90), fontsize=7.5, y=1.0, va="bottom")
    return fig


# -- SLO scale -------------------------------------------------------------------------------------------------


def slo_scale_curves(requests: pd.DataFrame, scales: list[float]) -> pd.DataFrame:
    """Attainment of each (engine, rate) with both of its SLOs multiplied by each scale (measured requests of
    valid runs; a Wilson interval per point)."""
    ok = requests[requests["status"] == "ok"] if "status" in requests else requests
    if "run_valid" in ok and ok["run_valid"].any():
        ok = ok[ok["run_valid"].astype(bool)]
    if "measured" in ok:
        ok = ok[ok["measured"].fillna(True).astype(bool)]
    rows = []
    # Runs of one engine and rate under different base SLOs (slo=tight,loose), or TPOT read differently, are
    # different curves.
    ok = ok.assign(slo_tpot_definition=ok["slo_tpot_definition"].fillna("mean")
                   if "slo_tpot_definition" in ok else "mean")
    for (engine, rate, base_ttft, base_tpot, d), g in ok.groupby(["engine", "rate", "slo_ttft_s", "slo_tpot_s",
                                                                  "slo_tpot_definition"]):
        for s in scales:
            met = M.slo_met(g, s * base_ttft, s * base_tpot, d)
            lo, hi = U.wilson(int(met.sum()), len(g))
            rows.append({"engine": engine, "rate": rate, "slo_scale": s, "slo_attainment": float(met.mean()),
                         "slo_attainment_ci_low": lo, "slo_attainment_ci_high": hi, "n_requests": len(g),
                         "slo_ttft_s": base_ttft, "slo_tpot_s": base_tpot, "tpot_definition": d})
    return pd.DataFrame(rows)


def slo_scale_figure(curves: pd.DataFrame, caption: str, target: float):
    if "tpot_definition" not in curves:
        curves = curves.assign(tpot_definition="mean")
    facets = list(curves.groupby(["slo_ttft_s", "slo_tpot_s", "rate", "tpot_definition"], sort=True))
    several_slos = curves[["slo_ttft_s", "slo_tpot_s"]].drop_duplicates().shape[0] > 1
    several_defs = curves["tpot_definition"].nunique() > 1
    styles = engine_styles(curves["engine"].unique())
    cols = min(4, len(facets))
    rows = math.ceil(len(facets) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.4 * cols, 2.8 * rows), squeeze=False)
    for ax in axes.flat[len(facets):]:
        ax.set_visible(False)
    for ax, ((base_ttft, base_tpot, rate, d), g) in zip(axes.flat, facets):
        for engine, ge in g.groupby("engine"):
            st = styles[engine]
            ge = ge.sort_values("slo_scale")
            ax.plot(ge["slo_scale"], 100 * ge["slo_attainment"], marker=st["marker"], ls=st["ls"], color=st["color"],
                    ms=5, lw=1.4)
            ax.fill_between(ge["slo_scale"], 100 * ge["slo_attainment_ci_low"], 100 * ge["slo_attainment_ci_high"],
                            color=st["color"], alpha=0.15, lw=0)
        ax.axhline(100 * target, color="0.3", ls=":", lw=1.0)
        ax.set(xlabel="SLO scale (x both SLOs)", ylabel="SLO attainment (%)", ylim=(-3, 103))
        ax.set_title(f"{rate:g} req/s" + (f", base SLO {_fmt_s(base_ttft)} / {_fmt_s(base_tpot)}" if several_slos
                                          else "") + (f", TPOT {d}" if several_defs else ""), fontsize=8)
    _legend(fig, styles)
    fig.tight_layout()
    fig.suptitle(_wrap(caption), fontsize=7.5, y=1.0, va="bottom")
    return fig


# -- the sweep -------------------------------------------------------------------------------------------------


def load_sweep(sweep_dir: Path) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame, pd.DataFrame]:
    """(summary, requests, points, goodput) of a saved sweep."""
    if not (sweep_dir / "summary.csv").is_file():
        raise FileNotFoundError(f"{sweep_dir}: no summary.csv (a sweep writes it when it ends; for one that did not "
                                f"end: python -m experiments.sweep.aggregate {sweep_dir})")
    summary = pd.read_csv(sweep_dir / "summary.csv")
    req_path = sweep_dir / "requests.parquet"
    requests = pd.DataFrame()
    if req_path.is_file():  # without the per-token lists, which no sweep figure reads
        import pyarrow.parquet as pq

        names = pq.read_schema(req_path).names
        requests = pd.read_parquet(req_path, columns=[c for c in names if c not in PER_TOKEN])
    swept = _swept(sweep_dir, summary)
    pts = P.points(summary, requests, swept) if not summary.empty else pd.DataFrame()
    target = P.target_attainment(_configs(sweep_dir))
    gp = P.goodput_table(pts, summary, target, swept)
    return summary, requests, pts, gp


def make_figures(sweep_dir: str | Path, tables: Optional[tuple] = None) -> list[str]:
    """The sweep's figures under <sweep>/figures/; `tables`: (summary, requests, points, goodput) as the sweep's
    aggregation just made them (read from its files otherwise)."""
    return sweep_figures(sweep_dir, tables) + job_file_figures(sweep_dir)


def sweep_figures(sweep_dir: str | Path, tables: Optional[tuple] = None) -> list[str]:
    """The figures drawn from the sweep's tables: attainment, latency and E2E against rate, goodput, SLO scale."""
    sweep_dir = Path(sweep_dir)
    out = sweep_dir / "figures"
    summary, requests, pts, gp = tables if tables is not None else load_sweep(sweep_dir)
    sns.set_theme(style="whitegrid", context="paper")
    paths: list[str] = []
    if summary.empty or not (summary["status"] == "ok").any():
        return paths
    target = P.target_attainment(_configs(sweep_dir))
    caption = context(sweep_dir, summary, pts)
    if not pts.empty:
        paths += _save(attainment_figure(pts, caption, target), out, "slo_attainment_vs_rate")
        paths += _save(latency_figure(pts, caption), out, "p90_latency_vs_rate")
        paths += _save(e2e_figure(pts, caption), out, "mean_e2e_vs_rate")
    if not gp.empty:
        paths += _save(goodput_figure(gp, context(sweep_dir, summary) + "\nerror bars: the goodput rule applied to the "
                                      "ends of each point's 95% attainment interval", target), out, "goodput_per_engine")

    if not requests.empty and {"slo_ttft_s", "slo_tpot_s"} <= set(requests.columns):
        curves = slo_scale_curves(requests, slo_scales(sweep_dir))
        if not curves.empty:
            paths += _save(slo_scale_figure(curves, context(sweep_dir, summary), target), out,
                           "slo_attainment_vs_slo_scale")
    return paths


def job_file_figures(sweep_dir: str | Path) -> list[str]:
    """The figures drawn from the jobs' own files: the semi-PD partition and the server's queues over time
    (needing no aggregation, a sweep draws them in a second process while it aggregates)."""
    sweep_dir = Path(sweep_dir)
    out = sweep_dir / "figures"
    sns.set_theme(style="whitegrid", context="paper")
    paths: list[str] = []
    if not any(_job_meta(jd)["job"].get("status") == "ok" for jd in job_dirs(sweep_dir)):
        return paths
    timeline = partition_timeline(sweep_dir)
    if not timeline.empty:
        paths += _save(partition_figure(timeline, partition_requests(sweep_dir, timeline)), out,
                       "partition_over_time")
    series = server_timeseries(sweep_dir)
    if not series.empty:
        paths += _save(server_metrics_figure(series), out, "server_queues_and_kv_over_time")
    return paths


# -- the partition over time -----------------------------------------------------------------------------------


def _job_meta(jd: Path) -> dict[str, Any]:
    job = json.loads((jd / "job.json").read_text()) if (jd / "job.json").is_file() else {}
    summ = json.loads((jd / "summary.json").read_text()) if (jd / "summary.json").is_file() else {}
    return {"job": job, "summary": summ}


def partition_timeline(sweep_dir: Path) -> pd.DataFrame:
    """Partition decisions that semi-PD jobs log in <job>/partition_log.jsonl (one row per window), on the
    load's clock: seconds since the load generator's first scheduled request."""
    rows = []
    for f in sorted(Path(sweep_dir).rglob("partition_log.jsonl")):
        if "probes" in f.parts:
            continue
        jd = f.parent
        meta = _job_meta(jd)
        job, summ = meta["job"], meta["summary"]
        # Real engines log time since the engine started; it was ready `server_ready_monotonic`, the load began
        # at `t0_monotonic`. A simulated engine's clock is the load's already.
        offset, clock = 0.0, "load"
        if job.get("backend", "real") != "sim":
            if job.get("server_ready_monotonic") is not None and summ.get("t0_monotonic") is not None:
                offset = float(job["server_ready_monotonic"]) - float(summ["t0_monotonic"])
            else:
                clock = "engine"
        rel = str(jd.relative_to(sweep_dir))
        for line in f.read_text().splitlines():
            d = json.loads(line)
            rows.append({"job": rel, "time_s": d["time_s"] + offset, "clock": clock, "prefill": d["prefill_share"],
                         "decode": d["decode_share"], "rate": d.get("rate"), "reason": d.get("reason"),
                         "observed_ttft_s": d.get("observed_ttft_s"), "observed_tpot_s": d.get("observed_tpot_s"),
                         "engine": job.get("engine"), "seed": job.get("seed"), "load_rate": job.get("rate"),
                         "overrides": job.get("overrides") or {},
                         "slo_ttft_s": (job.get("slo") or {}).get("ttft_s"),
                         "slo_tpot_s": (job.get("slo") or {}).get("tpot_s")})
    return pd.DataFrame(rows)


def partition_requests(sweep_dir: Path, timeline: pd.DataFrame) -> dict[str, pd.DataFrame]:
    out = {}
    for job in timeline["job"].unique():
        f = Path(sweep_dir) / job / "requests.parquet"
        if f.is_file():
            df = pd.read_parquet(f)
            out[job] = df[df["measured"]] if "measured" in df else df
    return out


def _run_title(g: pd.DataFrame, varying: set[str]) -> str:
    """The run's engine, starting partition, load and seed, and whatever else differs between the runs drawn."""
    r = g.iloc[0]
    start = g.sort_values("time_s").iloc[0]
    parts = [str(r.get("engine") or "semi-PD"), f"start ({int(start['prefill'])}, {int(start['decode'])})"]
    if r.get("load_rate") is not None and not (isinstance(r["load_rate"], float) and math.isnan(r["load_rate"])):
        parts.append(f"{r['load_rate']:g} req/s")
    if r.get("seed") is not None and not (isinstance(r["seed"], float) and math.isnan(r["seed"])):
        parts.append(f"seed {int(r['seed'])}")
    ov = r.get("overrides") or {}
    parts += [f"{k}={ov[k]}" for k in sorted(varying) if k in ov and k not in
              ("engine", "workload.rate", "workload.seed", "engine.prefill_share", "engine.decode_share")]
    return ", ".join(parts)


def _windowed(req: pd.DataFrame, edges: np.ndarray, col: str, q: float = 90) -> np.ndarray:
    out = np.full(len(edges) - 1, np.nan)
    if req is None or req.empty or col not in req:
        return out
    idx = np.digitize(req["scheduled_s"].to_numpy(dtype=float), edges) - 1
    vals = req[col].to_numpy(dtype=float)
    for i in range(len(edges) - 1):
        v = vals[(idx == i) & ~np.isnan(vals)]
        if v.size:
            out[i] = np.percentile(v, q)
    return out


def partition_figure(timeline: pd.DataFrame, requests: Optional[dict[str, pd.DataFrame]] = None,
                     max_cols: int = 3):
    """One run per panel (wrapping after `max_cols`), runs ordered by rate and seed; each panel stacks, on one
    time axis (seconds since the load started), the prefill and decode shares, the arrival rate, and the
    observed P90 TTFT and TPOT of the requests arriving in each window against their SLOs."""
    requests = requests or {}
    order = timeline.drop_duplicates("job").sort_values(["load_rate", "seed", "job"], na_position="last")
    jobs = list(order["job"])
    overrides = [dict(timeline[timeline["job"] == j]["overrides"].iloc[0] or {}) for j in jobs]
    varying = {k for k in set().union(*overrides) if len({str(o.get(k)) for o in overrides}) > 1}
    has_req = any(j in requests for j in jobs)
    per = 4 if has_req else 2
    cols = min(max_cols, len(jobs))
    blocks = math.ceil(len(jobs) / cols)
    fig = plt.figure(figsize=(4.4 * cols, (1.25 * per + 0.7) * blocks), layout="constrained")
    subfigs = np.atleast_2d(fig.subfigures(blocks, cols, squeeze=False))
    for i, job in enumerate(jobs):
        sf = subfigs[i // cols, i % cols]
        panel = sf.subplots(per, 1, sharex=True, gridspec_kw={"height_ratios": [1.2] + [1] * (per - 1)})
        g = timeline[timeline["job"] == job].sort_values("time_s")
        req = requests.get(job)
        t_end = max(float(g["time_s"].max()), float(req["finish_s"].max()) if req is not None and len(req) else 0.0)
        t = np.append(g["time_s"].to_numpy(dtype=float), t_end)
        ax = panel[0]
        ax.step(t, np.append(g["prefill"], g["prefill"].iloc[-1]), where="post", label="prefill", lw=1.8)
        ax.step(t, np.append(g["decode"], g["decode"].iloc[-1]), where="post", label="decode", lw=1.8, ls="--")
        changes = g[(g["prefill"].diff() != 0) | (g["decode"].diff() != 0)]
        for _, ch in changes.iterrows():  # the partition in words where it changes (lines at equal shares overlap)
            ax.annotate(f"({int(ch['prefill'])}, {int(ch['decode'])})", (ch["time_s"], 4), fontsize=6.5,
                        color="0.25", ha="left", va="bottom")
        ax.set(ylim=(0, 110), ylabel="share (%)")
        ax.legend(fontsize=6.5, loc="center right", frameon=True, ncol=2)
        # wrapped to its panel (~13 characters an inch at 8 pt): a long title ran into its neighbour's
        sf.suptitle(textwrap.fill(_run_title(g, varying), 56), fontsize=8)
        diffs = np.diff(g["time_s"].to_numpy(dtype=float))
        width = float(np.median(diffs[diffs > 0])) if (diffs > 0).any() else 2.0
        edges = np.arange(min(0.0, float(g["time_s"].min())), t_end + width, width)
        ax = panel[1]
        if req is not None and len(req):
            counts, _ = np.histogram(req["scheduled_s"].dropna(), bins=edges)
            ax.bar(edges[:-1], counts / width, width=width, align="edge", color="0.6", alpha=0.7)
        elif g["rate"].notna().any():
            ax.bar(g["time_s"], g["rate"].fillna(0), width=-width, align="edge", color="0.6", alpha=0.7)
        ax.set_ylabel("arrivals\n(req/s)")
        if has_req:
            for ax, (c, slo_col, label) in zip(panel[2:], (("ttft_s", "slo_ttft_s", "P90 TTFT"),
                                                          ("tpot_s", "slo_tpot_s", "P90 TPOT"))):
                p90 = _windowed(req, edges, c)
                slo = g[slo_col].dropna()
                allv = np.append(p90[~np.isnan(p90)], slo.to_numpy(dtype=float))
                scale, unit = (1e3, "ms") if allv.size == 0 or np.nanmax(allv) < 1 else (1.0, "s")
                ax.step(np.append(edges[:-1], edges[-1]), np.append(p90, p90[-1] if p90.size else np.nan) * scale,
                        where="post", color="k", lw=1.4)
                if not slo.empty:
                    ax.axhline(float(slo.iloc[0]) * scale, color="crimson", ls=(0, (4, 2)), lw=1.0)
                    ax.annotate("SLO", (0.99, float(slo.iloc[0]) * scale), xycoords=("axes fraction", "data"),
                                fontsize=7, color="crimson", ha="right", va="bottom")
                _maybe_log(ax, allv * scale)
                ax.set_ylabel(f"{label}\n({unit})")
        clock = g["clock"].iloc[0]
        panel[-1].set_xlabel("time since the load started (s)" if clock == "load" else "time since engine start (s)")
        for ax in panel:
            ax.tick_params(labelsize=7)
            ax.yaxis.label.set_size(7.5)
    for j in range(len(jobs), cols * blocks):
        subfigs[j // cols, j % cols].set_visible(False)
    caption = ("semi-PD partition over time, one run per panel: shares, offered load, and the P90 latency of "
               "the requests arriving in each window against the SLO")
    # Wrapped to the figure's width: one narrow panel must not be stretched by its caption.
    width_chars = max(40, int(fig.get_figwidth() * 14))
    fig.suptitle(textwrap.fill(caption, width_chars), fontsize=8.5)
    return fig


# -- one job ---------------------------------------------------------------------------------------------------


def request_latency_figure(req: pd.DataFrame, slo: dict[str, Any], title: str):
    """Each request's TTFT and TPOT against the time it was scheduled, with the SLOs: where in the load the
    misses happened. Warm-up requests (not counted) are grey; a goodput search's probes each get a colour."""
    fig, axes = plt.subplots(2, 1, figsize=(6.5, 4.2), sharex=True)
    groups = list(req.groupby("probe_rate")) if "probe_rate" in req else [(None, req)]
    for ax, (col, slo_key, label) in zip(axes, (("ttft_s", "ttft_s", "TTFT"), ("tpot_s", "tpot_s", "TPOT"))):
        vals = req[col] if col in req else pd.Series(dtype=float)
        limit = slo.get(slo_key)
        scale, unit = _latency_scale(pd.concat([vals, pd.Series([limit], dtype=float)]))
        for rate, g in groups:
            measured = g["measured"].astype(bool) if "measured" in g else pd.Series(True, index=g.index)
            ax.scatter(g.loc[measured, "scheduled_s"], g.loc[measured, col] * scale, s=8, alpha=0.7,
                       label=None if rate is None else f"{rate:g} req/s")
            ax.scatter(g.loc[~measured, "scheduled_s"], g.loc[~measured, col] * scale, s=8, color="0.6",
                       label="warm-up (not counted)" if ax is axes[0] and rate == groups[0][0] else None)
        if limit is not None:
            ax.axhline(float(limit) * scale, color="crimson", ls=(0, (4, 2)), lw=1.0, label="SLO")
        _maybe_log(ax, vals.to_numpy(dtype=float) * scale)
        ax.set_ylabel(f"{label} ({unit})")
    axes[-1].set_xlabel("scheduled time since the load started (s)")
    axes[0].legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    return fig


def job_figures(job_dir: str | Path) -> list[str]:
    """One job's own figures, as PNGs under <job>/job_figures/ (apart from a sweep's figures/, which a single
    run writes into the same directory): its requests' latency over time against the SLOs, the server's queues
    and KV use over time, and the semi-PD partition over time where the job logged one."""
    jd = Path(job_dir)
    out = jd / "job_figures"
    job = json.loads((jd / "job.json").read_text()) if (jd / "job.json").is_file() else {}
    rate = job.get("rate")
    title = str(job.get("engine", "job")) + (f" at {rate:g} req/s" if isinstance(rate, (int, float)) else "")
    sns.set_theme(style="whitegrid", context="paper")
    figs = []
    if (jd / "requests.parquet").is_file():
        req = pd.read_parquet(jd / "requests.parquet")
        if not req.empty and {"scheduled_s", "ttft_s"} <= set(req.columns):
            figs.append((request_latency_figure(req, job.get("slo") or {}, title), "latency_over_time"))
    series = job_timeseries(jd)
    if series is not None and {"requests_running", "requests_waiting", "kv_usage"} & set(series.columns):
        series = series.assign(engine=job.get("engine", "job"), rate=rate if rate is not None else 0.0)
        figs.append((server_metrics_figure(series), "server_queues_and_kv_over_time"))
    timeline = partition_timeline(jd)
    if not timeline.empty:
        figs.append((partition_figure(timeline, partition_requests(jd, timeline)), "partition_over_time"))
    paths = []
    for fig, name in figs:
        out.mkdir(parents=True, exist_ok=True)
        path = out / f"{name}.png"
        fig.savefig(path, bbox_inches="tight", dpi=120)
        plt.close(fig)
        paths.append(str(path))
    return paths


def main() -> None:
    args = sys.argv[1:]
    draw = make_figures
    if args[:1] == ["--job-files"]:  # only the figures drawn from the jobs' own files (a sweep's second process)
        draw, args = job_file_figures, args[1:]
    if args[:1] == ["--on-go"]:  # started with its sweep: imported, it waits for the jobs to end
        args = args[1:]
        if sys.stdin.readline().strip() != "go":
            return  # the sweep ended without its figures (end of file)
    if len(args) != 1 or not Path(args[0]).is_dir():
        print("usage: python -m experiments.figures [--job-files [--on-go]] <sweep dir>", file=sys.stderr)
        sys.exit(2)
    for p in draw(args[0]):
        print(p)


if __name__ == "__main__":
    main()
