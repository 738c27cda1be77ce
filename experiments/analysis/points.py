"""From a sweep's runs to the points a figure draws: seeds pooled, invalid runs set aside, intervals attached;
and goodput read off each curve by a rule that says when it cannot be trusted.

A *point* is one configuration: every swept key but the seed (`workload.seed`). Its runs are its seeds. Only
valid runs (status `ok`, client self-check passed, host quiet, run complete) count; a point whose runs are all
invalid keeps their pooled values with `valid = False`, so a figure can show it apart instead of dropping it
silently.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, Optional

import pandas as pd

from experiments.analysis import request_metrics as M
from experiments.analysis import uncertainty as U

SEED_KEYS = ("workload.seed", "seed", "experiment.goodput_seeds")
# Keys that are not a dimension of a point (bookkeeping, or the x axis / hue handled on their own).
# workload.load sets the rate (a fraction of the measured capacity): it is the x axis, like the rate.
NOT_POINT_KEYS = {"engine", "workload.rate", "workload.load", *SEED_KEYS}


def point_keys(summary: pd.DataFrame, swept: Sequence[str]) -> list[str]:
    """engine, rate, then every other swept key (the seed excepted) that takes more than one value."""
    extra = [k for k in swept if k in summary.columns and k not in NOT_POINT_KEYS and k != "rate"
             and summary[k].astype(str).nunique() > 1]
    return ["engine", *extra, "rate"]


def run_is_valid(summary: pd.DataFrame) -> pd.Series:
    ok = summary["status"] == "ok" if "status" in summary else pd.Series(True, index=summary.index)
    for col in ("valid", "client_valid"):
        if col in summary:
            ok &= summary[col].map(lambda v: v is not False and str(v) != "False")
    return ok


def _run_requests(df: pd.DataFrame) -> pd.DataFrame:
    """One run's measured requests (`df`: its rows), with whether each met the run's SLOs."""
    if "measured" in df:
        df = df[df["measured"].fillna(True).astype(bool)]
    if df.empty:
        return df
    definition = df["slo_tpot_definition"].iloc[0] if "slo_tpot_definition" in df else None
    met = M.slo_met(df, float(df["slo_ttft_s"].iloc[0]), float(df["slo_tpot_s"].iloc[0]),
                    definition if isinstance(definition, str) else "mean")
    return df.assign(met=met.astype(float))


def _job_mean_cis(row: pd.Series) -> dict[str, tuple[float, float]]:
    """The intervals of a finished job's mean latencies, as the job computed them over the same measured requests
    (`uncertainty.request_cis`, the same bootstrap and seed): a one-run point's are these, and a sweep of 80 jobs
    spent seconds drawing them again."""
    if row.get("status") != "ok":
        return {}
    out = {}
    for col in U.LATENCIES:
        lo, hi = row.get(f"mean_{col}_ci_low"), row.get(f"mean_{col}_ci_high")
        if lo is not None and hi is not None and not (math.isnan(lo) or math.isnan(hi)):  # NaN: a job that had none
            out[f"mean_{col}"] = (float(lo), float(hi))
    return out


def _flag(v) -> Optional[bool]:
    """A boolean cell as summary.csv gives it back (True, "True", 1.0, NaN, None)."""
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return None
    return str(v) in ("True", "true", "1", "1.0")


def steady_state(runs: pd.DataFrame) -> dict[str, Any]:
    """A point reached steady state when every run behind it did (None: no run says: older files)."""
    if "steady_state" not in runs:
        return {}
    flags = [f for f in map(_flag, runs["steady_state"]) if f is not None]
    growth = pd.to_numeric(runs["backlog_growth"], errors="coerce") if "backlog_growth" in runs else pd.Series()
    return {"steady_state": all(flags) if flags else None,
            "backlog_growth": float(growth.max()) if growth.notna().any() else None}


def _duration(row: pd.Series) -> float:
    d = row.get("duration_s")
    if d is not None and not (isinstance(d, float) and math.isnan(d)):
        return float(d)
    thr, n = row.get("request_throughput"), row.get("num_requests", 0) - row.get("num_errors", 0)
    return float(n / thr) if thr and not math.isnan(thr) and thr > 0 else math.nan


def points(summary: pd.DataFrame, requests: pd.DataFrame, swept: Sequence[str] = ()) -> pd.DataFrame:
    """One row per point (single-rate runs; goodput searches are summarised by `goodput_table`)."""
    if summary.empty or requests.empty or "job" not in requests:
        return pd.DataFrame()
    runs = summary[summary.get("mode", pd.Series("single", index=summary.index)).fillna("single") != "goodput"]
    runs = runs[runs["status"].isin(["ok", "incomplete", "interrupted"])] if "status" in runs else runs
    if runs.empty:
        return pd.DataFrame()
    keys = point_keys(runs, swept)
    valid = run_is_valid(runs)
    by_job = dict(tuple(requests.groupby("job", sort=False)))  # once: a mask per job read every row 80 times
    none = requests.iloc[:0]
    rows = []
    for key, g in runs.assign(_valid=valid).groupby(keys, dropna=False, sort=True):
        use = g[g["_valid"]] if g["_valid"].any() else g
        frames, durations = [], []
        for _, r in use.iterrows():
            f = _run_requests(by_job.get(r["job"], none))
            if len(f):
                frames.append(f)
                durations.append(_duration(r))
        stats = U.point_stats(frames, durations, known=_job_mean_cis(use.iloc[0]) if len(frames) == 1 else None) \
            if frames else {"n_requests": 0, "n_seeds": 0}
        first = g.iloc[0]
        reasons = sorted({x for x in g.loc[~g["_valid"], "invalid_reasons"].dropna() if x}) \
            if "invalid_reasons" in g else []
        rows.append({**dict(zip(keys, key if isinstance(key, tuple) else (key,))),
                     "valid": bool(g["_valid"].any()), "n_runs": len(g), "n_invalid": int((~g["_valid"]).sum()),
                     **stats, **steady_state(use), "slo_ttft_s": first.get("slo_ttft_s"),
                     "slo_tpot_s": first.get("slo_tpot_s"),
                     "invalid_reasons": "; ".join(reasons)})
    out = pd.DataFrame(rows)
    out.attrs["keys"] = keys
    return out


def goodput_from_curve(rates, attainments, target: float = 0.9) -> dict[str, Any]:
    """Highest rate whose attainment, and that of every lower tested rate, is >= target; linearly
    interpolated towards the first failing rate above it.

    `at_range_top`: every tested rate passed (the goodput is at least the top rate, not a measurement of it);
    `at_range_bottom`: even the lowest tested rate failed (reported as 0); `monotone`: no tested rate fails below
    one that passes (where it does, the rule stops at the first failure).
    """
    pts = sorted((float(r), float(a)) for r, a in zip(rates, attainments) if not math.isnan(float(a)))
    out = {"goodput_rate": 0.0, "goodput_at_range_top": False, "goodput_at_range_bottom": False,
           "goodput_monotone": True, "goodput_n_rates": len(pts), "goodput_top_rate": pts[-1][0] if pts else math.nan,
           "goodput_low_rate": pts[0][0] if pts else math.nan}
    if not pts:
        return out
    passed = [a >= target for _, a in pts]
    out["goodput_monotone"] = all(not (not p and any(passed[i + 1:])) for i, p in enumerate(passed))
    k = -1
    while k + 1 < len(pts) and passed[k + 1]:
        k += 1
    if k < 0:  # even the lowest tested rate fails: the goodput is below the range, not zero
        out["goodput_at_range_bottom"] = True
        return out
    r, a = pts[k]
    if k + 1 == len(pts):
        out.update(goodput_rate=r, goodput_at_range_top=True)
        return out
    r2, a2 = pts[k + 1]
    out["goodput_rate"] = r + (a - target) / (a - a2) * (r2 - r) if a > a2 else r
    return out


def goodput_table(pts: pd.DataFrame, summary: Optional[pd.DataFrame] = None, target: float = 0.9,
                  swept: Sequence[str] = ()) -> pd.DataFrame:
    """Goodput per curve (engine and any other swept key but the rate): from the valid points of a rate sweep,
    with `goodput_ci_low/high` (the same rule on the attainment interval's ends), or from goodput searches."""
    rows = []
    if summary is not None and not summary.empty and "goodput_rate" in summary and summary["goodput_rate"].notna().any():
        searches = summary[summary["goodput_rate"].notna() & run_is_valid(summary)]
        keys = [k for k in point_keys(summary, swept) if k != "rate"]
        for key, g in searches.groupby(keys, dropna=False):
            row = dict(zip(keys, key if isinstance(key, tuple) else (key,)))
            v = g["goodput_rate"].astype(float)
            row.update(goodput_rate=float(v.mean()), n_seeds=len(g), source="search")
            if len(g) > 1:
                lo, hi = U.bootstrap_ci(v.to_numpy())
                row.update(goodput_ci_low=lo, goodput_ci_high=hi)
            for flag in ("goodput_at_range_top", "goodput_at_range_bottom"):
                if flag in g:
                    row[flag] = bool(g[flag].fillna(False).astype(bool).any())
            if "goodput_monotone" in g:
                row["goodput_monotone"] = bool(g["goodput_monotone"].fillna(True).astype(bool).all())
            rows.append(row)
        return pd.DataFrame(rows)
    if pts is None or pts.empty:
        return pd.DataFrame()
    keys = [k for k in pts.attrs.get("keys", ["engine", "rate"]) if k != "rate"]
    for key, everything in pts.groupby(keys, dropna=False):
        g = everything[everything["valid"]]
        row = dict(zip(keys, key if isinstance(key, tuple) else (key,)))
        # A curve read without some of its rates (their runs were invalid) is read across the gap: say so.
        row["goodput_invalid_points"] = int((~everything["valid"]).sum())
        if g.empty:
            row.update(goodput_rate=math.nan, n_seeds=0, source="curve")
            rows.append(row)
            continue
        row.update(goodput_from_curve(g["rate"], g["slo_attainment"], target))
        if "slo_attainment_ci_low" in g:
            row["goodput_ci_low"] = goodput_from_curve(g["rate"], g["slo_attainment_ci_low"], target)["goodput_rate"]
            row["goodput_ci_high"] = goodput_from_curve(g["rate"], g["slo_attainment_ci_high"], target)["goodput_rate"]
        row.update(n_seeds=int(g["n_seeds"].max()), source="curve")
        rows.append(row)
    return pd.DataFrame(rows)


def target_attainment(configs: Sequence[Optional[dict]]) -> float:
    for c in configs:
        t = ((c or {}).get("slo") or {}).get("target_attainment")
        if t is not None:
            return float(t)
    return 0.9
