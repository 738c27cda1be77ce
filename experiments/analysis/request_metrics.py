"""Per-request serving metrics, aggregates, SLO attainment, goodput and the client self-check.

Names are explicit: `ttft_s` (first token), `tpot_s` = (E2E - TTFT)/(output_tokens - 1),
`itl_s` (gaps between streamed tokens), `e2e_s`, `ntpot_s` = E2E/output_tokens,
`dispatch_lateness_s` = send - scheduled. Open-loop latencies start at the
scheduled time (a late client does not hide queueing); `*_from_send_s` columns
keep the send-time view.
"""

from __future__ import annotations

import math
from typing import Any, Optional

import numpy as np
import pandas as pd
from scipy import stats

from experiments.analysis import uncertainty as U

PERCENTILES = (50, 90, 99)


def derive(df: pd.DataFrame, measure_from: str = "scheduled") -> pd.DataFrame:
    """Add the derived latency columns to raw per-request rows (times in run seconds)."""
    df = df.copy()
    origin = df["scheduled_s"] if measure_from == "scheduled" else df["send_s"]
    df["dispatch_lateness_s"] = df["send_s"] - df["scheduled_s"]
    df["ttft_s"] = df["first_token_s"] - origin
    df["e2e_s"] = df["finish_s"] - origin
    df["ttft_from_send_s"] = df["first_token_s"] - df["send_s"]
    df["e2e_from_send_s"] = df["finish_s"] - df["send_s"]
    out = df["output_tokens"].astype(float)
    df["tpot_s"] = np.where(out > 1, (df["e2e_s"] - df["ttft_s"]) / (out - 1), np.nan)
    df["ntpot_s"] = np.where(out > 0, df["e2e_s"] / out.where(out > 0, 1), np.nan)
    df["itl_s"] = [list(np.diff(t)) if isinstance(t, (list, np.ndarray)) and len(t) > 1 else []
                   for t in df["token_times_s"]]
    bad = df["error"].notna()
    for c in ("ttft_s", "e2e_s", "tpot_s", "ntpot_s", "ttft_from_send_s", "e2e_from_send_s"):
        df.loc[bad, c] = np.nan
    return df


def slo_met(df: pd.DataFrame, ttft_s: float, tpot_s: float) -> pd.Series:
    """Both SLOs met; a failed request meets none, a one-token answer has no TPOT to miss."""
    ok = df["error"].isna()
    ttft_ok = df["ttft_s"] <= ttft_s
    tpot_ok = df["tpot_s"].isna() | (df["tpot_s"] <= tpot_s)
    return ok & ttft_ok & tpot_ok


def measured_mask(df: pd.DataFrame, warmup_s: float = 0.0, cooldown_s: float = 0.0,
                  warmup_requests: int = 0) -> pd.Series:
    if df.empty:
        return pd.Series([], dtype=bool, index=df.index)
    sched = df["scheduled_s"]
    last = sched.max()
    keep = pd.Series(True, index=df.index)
    if warmup_s or cooldown_s:
        keep &= (sched >= warmup_s) & (sched <= last - cooldown_s)
    if warmup_requests > 0:
        # Schedule order; a request never scheduled (interrupted before its time) counts by its index.
        order = sched.fillna(np.inf).rank(method="first")
        keep &= order > warmup_requests
    return keep.astype(bool)


def mark_measured(df: pd.DataFrame, lcfg) -> pd.DataFrame:
    """Add the boolean `measured` column (saved with the rows, so every later statistic counts the same ones)."""
    return df.assign(measured=measured_mask(df, lcfg.warmup_s, lcfg.cooldown_s,
                                            getattr(lcfg, "warmup_requests", 0)))


def _pct(values) -> dict[str, Optional[float]]:
    v = np.asarray([x for x in values if x is not None and not math.isnan(x)], dtype=float)
    if v.size == 0:
        return {"mean": None, **{f"p{p}": None for p in PERCENTILES}}
    return {"mean": float(v.mean()), **{f"p{p}": float(np.percentile(v, p)) for p in PERCENTILES}}


def prefix_cache_hit_rate(ok: pd.DataFrame) -> Optional[float]:
    """Prompt tokens served from the prefix cache over prompt tokens, over the requests whose server said (usage
    `prompt_tokens_details.cached_tokens`); None where none did."""
    if "cached_tokens" not in ok:
        return None
    known = ok[ok["cached_tokens"].notna()]
    prompt = float(known["prompt_tokens"].sum())
    return float(known["cached_tokens"].sum()) / prompt if len(known) and prompt > 0 else None


def aggregate(df: pd.DataFrame, ttft_slo: float, tpot_slo: float, duration_s: float) -> dict[str, Any]:
    ok = df[df["error"].isna()]
    out: dict[str, Any] = {
        "num_requests": int(len(df)), "num_ok": int(len(ok)), "num_errors": int(df["error"].notna().sum()),
        "duration_s": duration_s,
    }
    for c in ("ttft_s", "tpot_s", "e2e_s", "ntpot_s", "ttft_from_send_s", "e2e_from_send_s"):
        out[c] = _pct(ok[c])
    out["itl_s"] = _pct([x for lst in ok["itl_s"] for x in lst])
    out["dispatch_lateness_s"] = _pct(df["dispatch_lateness_s"].dropna())
    dur = max(duration_s, 1e-9)
    out["request_throughput"] = len(ok) / dur
    out["output_token_throughput"] = float(ok["output_tokens"].sum()) / dur
    out["total_token_throughput"] = float(ok["output_tokens"].sum() + ok["prompt_tokens"].sum()) / dur
    out["prefix_cache_hit_rate"] = prefix_cache_hit_rate(ok)
    met = slo_met(df, ttft_slo, tpot_slo)
    out["slo_attainment"] = float(met.mean()) if len(df) else 0.0
    out["goodput"] = float(met.sum()) / dur
    out["ci"] = U.request_cis(df, met, duration_s)  # 95% intervals: experiments/analysis/uncertainty.py
    return out


def self_check(df: pd.DataFrame, workload_cfg, loop_lag: list[float], interarrival=None) -> dict[str, Any]:
    """Did the client keep up with its own schedule? Marks the run invalid (with reasons) if not.

    `interarrival`: the scipy distribution the schedule drew its gaps from (None: no KS test).
    """
    schedule_kind = workload_cfg.arrival
    sends = np.sort(df["send_s"].dropna().to_numpy())
    res: dict[str, Any] = {"reasons": []}
    late = df["dispatch_lateness_s"].dropna().to_numpy()
    res["dispatch_lateness_p99_s"] = float(np.percentile(late, 99)) if late.size else None
    res["event_loop_lag_p99_s"] = float(np.percentile(loop_lag, 99)) if loop_lag else None
    res["event_loop_lag_max_s"] = float(max(loop_lag)) if loop_lag else None
    if schedule_kind in ("poisson", "gamma", "constant") and sends.size > 2:
        achieved = (sends.size - 1) / max(sends[-1] - sends[0], 1e-9)
        res["target_rate"], res["achieved_rate"] = workload_cfg.rate, achieved
        # The schedule is a random draw: compare with the rate it actually drew too.
        sched = np.sort(df["scheduled_s"].to_numpy())
        res["scheduled_rate"] = (sched.size - 1) / max(sched[-1] - sched[0], 1e-9)
        if abs(achieved / res["scheduled_rate"] - 1) > 0.05:
            res["reasons"].append(f"achieved rate {achieved:.2f}/s is off the schedule's "
                                  f"{res['scheduled_rate']:.2f}/s by >5%")
        if interarrival is not None and sends.size >= 20:
            ks = stats.kstest(np.diff(sends), interarrival.cdf)
            res["ks_statistic"], res["ks_pvalue"] = float(ks.statistic), float(ks.pvalue)
            # Large runs detect sub-millisecond jitter at any p-value: flag only a deviation that is
            # both significant and material (the CDFs differ by more than 5 points somewhere).
            if ks.pvalue < 0.001 and ks.statistic > 0.05:
                res["reasons"].append(f"inter-arrival times fail the KS test against {schedule_kind} "
                                      f"(D={ks.statistic:.3f}, p={ks.pvalue:.2g})")
    if res["dispatch_lateness_p99_s"] is not None and res["dispatch_lateness_p99_s"] > 0.01:
        res["reasons"].append(f"p99 dispatch lateness {1e3 * res['dispatch_lateness_p99_s']:.1f} ms > 10 ms")
    res["valid"] = not res["reasons"]
    return res
