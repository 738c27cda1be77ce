"""Per-request serving metrics, aggregates, SLO attainment, goodput and the client self-check.

Names are explicit: `ttft_s` (first token), `tpot_s` = (E2E - TTFT)/(output_tokens - 1),
`itl_s` (gaps between streamed tokens), `e2e_s`, `ntpot_s` = E2E/output_tokens,
`dispatch_lateness_s` = send - scheduled. Open-loop latencies start at the
scheduled time (a late client does not hide queueing); `*_from_send_s` columns
keep the send-time view.

The TPOT SLO has more than one reading (`slo.tpot_definition`, TPOT_DEFINITIONS): the paper's per-request mean,
or a statistic of the request's own gaps between tokens after its first. A mean forgives a stall: a request may
wait n_out x (SLO - TPOT) after its first token and still meet it, which is how a phase-split engine (first token
fast, then parked behind its decode cap) can look good. Every run is judged under every definition so a ranking
that depends on the reading shows. Gaps come from `token_times_s`: one time per token in the simulator, one per
streamed chunk from the client (a chunk may carry several tokens; the gap is then between deliveries, which is
what a reader waits). A request with more than one token but fewer than two times (a non-streamed answer) has no
gaps: its value is NaN and it cannot meet a gap definition.

Steady state (`steady_state`): the measured arrivals split in two halves by time; the run's backlog still grew
when the second half holds clearly more requests in the system, or meets the SLOs clearly less often, than the
first (thresholds below).
"""

from __future__ import annotations

from typing import Any, Optional

import numpy as np
import pandas as pd
from scipy import stats

from experiments.analysis import uncertainty as U

PERCENTILES = (50, 90, 99)
# slo.tpot_definition -> the per-request column (seconds) compared with slo.tpot_s.
TPOT_DEFINITIONS = {"mean": "tpot_s",  # (E2E - TTFT) / (output_tokens - 1): the paper's show_result.py
                    "p90_itl": "tpot_p90_itl_s", "p99_itl": "tpot_p99_itl_s",  # the request's own gaps
                    "max_itl": "tpot_max_itl_s",  # its longest stall after the first token
                    "first_to_second": "tpot_first_to_second_s"}  # first token to second
# The backlog still grows (no steady state) when the second half's mean number of requests in the system exceeds
# the first's by more than this fraction AND by more than this many requests (a handful in flight jitters) ...
BACKLOG_GROWTH_RATIO = 0.25
BACKLOG_GROWTH_MIN_REQUESTS = 2.0
# ... or when the second half's attainment is this much (absolute) below the first's.
ATTAINMENT_DROP = 0.10
# Fewer measured requests than this in a half: no verdict (None).
STEADY_MIN_REQUESTS_PER_HALF = 5
# Multi-turn: over the plateau (conversation_plateau), turns must go out at this fraction of the offered rate.
OFFERED_RATE_MIN = 0.8
# ... the plateau starts once this percentile of conversations could have reached their last turn.
PLATEAU_SPAN_PERCENTILE = 90


def check_tpot_definition(name: str) -> str:
    if name not in TPOT_DEFINITIONS:
        raise ValueError(f"slo.tpot_definition={name!r}: expected one of {', '.join(TPOT_DEFINITIONS)}")
    return name


def _n_times(df: pd.DataFrame) -> np.ndarray:
    if "token_times_s" not in df:
        return np.zeros(len(df), dtype=int)
    return np.array([len(t) if isinstance(t, (list, np.ndarray)) else 0 for t in df["token_times_s"]], dtype=int)


_NO_TIMES = np.empty(0)


def token_gaps(df: pd.DataFrame) -> tuple[np.ndarray, np.ndarray]:
    """Every request's gaps between consecutive token times, concatenated in row order, and each row's number
    of gaps (0 without two times). One `np.diff` over all rows: a per-request loop cost seconds per run."""
    if "token_times_s" not in df or df.empty:
        return _NO_TIMES, np.zeros(len(df), dtype=np.intp)
    times = [np.asarray(t, dtype=float) if isinstance(t, (list, np.ndarray)) else _NO_TIMES
             for t in df["token_times_s"]]
    n = np.fromiter(map(len, times), dtype=np.intp, count=len(times))
    flat = np.concatenate(times) if len(times) else _NO_TIMES
    if flat.size < 2:
        return _NO_TIMES, np.zeros(len(df), dtype=np.intp)
    within = np.ones(flat.size - 1, dtype=bool)
    ends = np.cumsum(n)
    within[ends[(n > 0) & (ends < flat.size)] - 1] = False  # the gap from one row's last time to the next's first
    return np.diff(flat)[within], np.maximum(n - 1, 0)


def segment_percentiles(values: np.ndarray, counts: np.ndarray, qs) -> np.ndarray:
    """np.percentile(segment, qs) of each non-empty segment of `values` (consecutive runs of `counts`), all at
    once: rows x len(qs), NaN for an empty segment. The same arithmetic as numpy's linear method (its virtual
    index, floor and two-sided interpolation), so each value equals np.percentile's to the last bit."""
    out = np.full((len(counts), len(qs)), np.nan)
    has = counts > 0
    if not has.any():
        return out
    ends = np.cumsum(counts)
    # Each segment sorted on its own: a few hundred values a sort, ~6x faster than one lexsort by (segment, value)
    v = np.concatenate([np.sort(values[s:e]) for s, e in zip((ends - counts).tolist(), ends.tolist()) if e > s])
    starts = (ends - counts)[has]
    m = counts[has]
    for j, q in enumerate(np.true_divide(np.asarray(qs, dtype=float), 100)):
        virtual = (m - 1) * q
        prev = np.floor(virtual)
        top = virtual >= m - 1
        lo = np.where(top, m - 1, prev).astype(np.intp)
        hi = np.where(top, m - 1, prev + 1).astype(np.intp)
        a, b = v[starts + lo], v[starts + hi]
        t = np.where(top, 0.0, virtual - prev)
        d = b - a
        out[has, j] = np.where(t >= 0.5, b - d * (1 - t), a + d * t)
    return out


def gap_columns(df: pd.DataFrame, gaps: Optional[tuple[np.ndarray, np.ndarray]] = None) -> pd.DataFrame:
    """The gap-based TPOT of each request (TPOT_DEFINITIONS but `mean`) from its token times; NaN for a failed
    request, a one-token answer (no TPOT) and one without two times to take a gap between. `gaps`: token_gaps(df)
    where the caller has it."""
    cols = [c for d, c in TPOT_DEFINITIONS.items() if d != "mean"]
    g, counts = gaps if gaps is not None else token_gaps(df)
    vals = np.full((len(df), len(cols)), np.nan)
    has = counts > 0
    if has.any():
        vals[:, :2] = segment_percentiles(g, counts, [90, 99])
        starts = (np.cumsum(counts) - counts)[has]
        vals[has, 2] = np.maximum.reduceat(g, starts)
        vals[has, 3] = g[starts]
    out = pd.DataFrame(vals, columns=cols, index=df.index)
    no_tpot = df["output_tokens"].astype(float) <= 1
    if "error" in df:
        no_tpot |= df["error"].notna()
    out.loc[no_tpot.to_numpy()] = np.nan
    return out


def tpot_values(df: pd.DataFrame, definition: str = "mean") -> pd.Series:
    """Each request's TPOT under `definition` (rows saved before a definition's column existed: from their token
    times)."""
    col = TPOT_DEFINITIONS[check_tpot_definition(definition)]
    if col in df:
        return df[col]
    if definition == "mean":
        raise KeyError("tpot_s")
    return gap_columns(df)[col]


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
    g, counts = token_gaps(df)
    itl = np.empty(len(df), dtype=object)  # one array per row (a list of equal-length arrays would go 2-D)
    for i, a in enumerate(np.split(g, np.cumsum(counts)[:-1]) if len(df) else []):
        itl[i] = a
    df["itl_s"] = itl
    gaps = gap_columns(df, (g, counts))
    df[list(gaps.columns)] = gaps
    bad = df["error"].notna()
    for c in ("ttft_s", "e2e_s", "tpot_s", "ntpot_s", "ttft_from_send_s", "e2e_from_send_s"):
        df.loc[bad, c] = np.nan
    return df


def slo_met(df: pd.DataFrame, ttft_s: float, tpot_s: float, definition: str = "mean") -> pd.Series:
    """Both SLOs met, TPOT read as `definition`; a failed request meets none, a one-token answer has no TPOT to
    miss, and one whose gaps are unknown (no per-token times) cannot meet a gap definition."""
    ok = df["error"].isna()
    ttft_ok = df["ttft_s"] <= ttft_s
    v = tpot_values(df, definition)
    if definition == "mean":
        tpot_ok = v.isna() | (v <= tpot_s)
    else:
        tpot_ok = (df["output_tokens"].astype(float) <= 1) | (v <= tpot_s)
    return ok & ttft_ok & tpot_ok


def tpot_definitions(df: pd.DataFrame, ttft_s: float, tpot_s: float, chosen: str = "mean") -> dict[str, Any]:
    """The run judged under every TPOT definition, and its stalls: requests with a gap after their first token
    longer than the TPOT SLO. What no per-token time can tell (a run without any) is None, not a guess."""
    ok = df["error"].isna() & (df["output_tokens"].astype(float) > 1)
    timed = ok & pd.Series(_n_times(df) > 1, index=df.index)
    untimed = bool(ok.any() and not timed.any())
    att: dict[str, Optional[float]] = {}
    for d in TPOT_DEFINITIONS:
        if d != "mean" and untimed:
            att[d] = None
        else:
            att[d] = float(slo_met(df, ttft_s, tpot_s, d).mean()) if len(df) else 0.0
    stalled = None if untimed else int((timed & (tpot_values(df, "max_itl") > tpot_s)).sum())
    out_tokens = df.loc[ok, "output_tokens"].astype(float)
    coverage = (float(np.minimum(_n_times(df)[ok.to_numpy()], out_tokens).sum() / out_tokens.sum())
                if ok.any() else None)
    return {"chosen": chosen, "slo_attainment": att, "stalled_requests": stalled,
            "stalled_fraction": None if stalled is None else (stalled / len(df) if len(df) else 0.0),
            # measured multi-token answers without two token times (not streamed): no gap to judge
            "requests_without_token_times": int((ok & ~timed).sum()),
            # timed tokens / output tokens: 1 with a time per token; below when a stream coalesced tokens
            "token_time_coverage": coverage}


def _in_system(arrivals: np.ndarray, finishes: np.ndarray, start: float, end: float) -> Optional[float]:
    """Time-averaged number of requests arrived and not finished over [start, end]."""
    if not end > start:
        return None
    a, f = np.clip(arrivals, start, end), np.clip(finishes, start, end)
    return float(np.clip(f - a, 0, None).sum() / (end - start))


def steady_state(df: pd.DataFrame, met: pd.Series, offered_rate: Optional[float] = None) -> dict[str, Any]:
    """Did the run reach steady state? `df`: every request (warm-up ones are in the system too) with `measured`;
    `met`: the SLO verdict of the measured ones. The measured arrivals split at the middle of their span; each
    half gets its requests, their attainment and the mean number in the system (queued or running) over it.
    `offered_rate`: of a multi-turn run, the requests/s it was to offer, checked against what was sent
    (`offered_rate_reached`)."""
    arrival = df["scheduled_s"].fillna(df["send_s"]) if "send_s" in df else df["scheduled_s"]
    known = arrival.notna()
    arr = arrival[known].to_numpy(dtype=float)
    fin = df.loc[known, "finish_s"].to_numpy(dtype=float)
    failed = df.loc[known, "error"].notna().to_numpy() if "error" in df else np.zeros(len(arr), dtype=bool)
    # No finish time: a failure the client saw no end of leaves no trace; anything else is still in the system.
    fin = np.where(np.isnan(fin), np.where(failed, arr, np.inf), fin)
    window = arrival[df["measured"].astype(bool) & known]
    out: dict[str, Any] = {"steady_state": None, "backlog_growth": None,
                           "thresholds": {"backlog_growth_ratio": BACKLOG_GROWTH_RATIO,
                                          "backlog_growth_min_requests": BACKLOG_GROWTH_MIN_REQUESTS,
                                          "attainment_drop": ATTAINMENT_DROP,
                                          "min_requests_per_half": STEADY_MIN_REQUESTS_PER_HALF},
                           "reasons": []}
    if offered_rate and "turn" in df:
        _offered(out, df, arrival, offered_rate)
    if window.empty:
        return out
    t0, t1 = float(window.min()), float(window.max())
    mid = (t0 + t1) / 2
    out["split_s"] = mid
    halves = {}
    for name, sel, (a, b) in (("first_half", window < mid, (t0, mid)), ("second_half", window >= mid, (mid, t1))):
        m = met.reindex(window.index[sel])
        halves[name] = {"requests": int(sel.sum()), "slo_attainment": float(m.mean()) if len(m) else None,
                        "mean_in_system": _in_system(arr, fin, a, b)}
    out.update(halves)
    first, second = halves["first_half"], halves["second_half"]
    if min(first["requests"], second["requests"]) < STEADY_MIN_REQUESTS_PER_HALF \
            or first["mean_in_system"] is None or second["mean_in_system"] is None:
        out["reasons"].append("too few measured requests to tell")
        return out
    growth = second["mean_in_system"] - first["mean_in_system"]
    out["backlog_growth"] = growth
    if growth > BACKLOG_GROWTH_RATIO * first["mean_in_system"] and growth > BACKLOG_GROWTH_MIN_REQUESTS:
        out["reasons"].append(f"requests in the system grew from {first['mean_in_system']:.1f} to "
                              f"{second['mean_in_system']:.1f} (mean, first vs second half)")
    drop = first["slo_attainment"] - second["slo_attainment"]
    if drop > ATTAINMENT_DROP:
        out["reasons"].append(f"attainment fell from {100 * first['slo_attainment']:.0f}% to "
                              f"{100 * second['slo_attainment']:.0f}% (first vs second half)")
    out["steady_state"] = not out["reasons"]
    return out


def conversation_plateau(df: pd.DataFrame) -> Optional[tuple[float, float]]:
    """The scheduled times over which a multi-turn run offered its full rate, or None (no conversations).

    A conversation's later turns follow its answers, so the request rate builds up while the first
    conversations reach their later turns, and decays once no new conversation starts. The plateau runs from
    the first start plus the span (first turn to last) of 90% of conversations, to the last start; it is empty
    (from >= to) when the conversations outlast the time over which they start."""
    if "turn" not in df or "conversation_id" not in df or not (df["turn"] > 0).any():
        return None
    sched = df["scheduled_s"]
    starts = sched[df["turn"] == 0].dropna()
    by = sched.groupby(df["conversation_id"])
    spans = (by.max() - by.min()).dropna().to_numpy(dtype=float)
    if starts.empty or not spans.size:
        return None
    return float(starts.min() + np.percentile(spans, PLATEAU_SPAN_PERCENTILE)), float(starts.max())


def _offered(out: dict[str, Any], df: pd.DataFrame, arrival: pd.Series, rate: float) -> None:
    """Turns sent per second over the plateau, against the rate offered."""
    plateau = conversation_plateau(df)
    if plateau is None:
        return
    a, b = plateau
    sent = int(((arrival >= a) & (arrival <= b)).sum())
    achieved = (sent - 1) / (b - a) if b > a and sent > 1 else 0.0
    out["plateau_s"], out["offered_rate"], out["sent_rate_on_plateau"] = [a, b], rate, achieved
    out["offered_rate_reached"] = achieved >= OFFERED_RATE_MIN * rate
    out["thresholds"]["offered_rate_min"] = OFFERED_RATE_MIN
    if not out["offered_rate_reached"]:
        why = (f"turns went out at {achieved:.2f} req/s of the {rate:g} offered" if b > a else
               "conversations outlast the time over which they start")
        out["reasons"].append(f"{why}: the run never offered its rate (more workload.num_requests, a lower rate, "
                              f"or shorter think times)")


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


def mark_measured(df: pd.DataFrame, lcfg, conversations: bool = False) -> pd.DataFrame:
    """Add the boolean `measured` column (saved with the rows, so every later statistic counts the same ones).
    With `conversations` (an open-loop multi-turn run), only the turns scheduled on the plateau, where the run
    offered its full rate (`conversation_plateau`), where it has one."""
    keep = measured_mask(df, lcfg.warmup_s, lcfg.cooldown_s, getattr(lcfg, "warmup_requests", 0))
    plateau = conversation_plateau(df) if conversations else None
    if plateau is not None and plateau[0] < plateau[1]:
        keep &= df["scheduled_s"].between(*plateau)
    return df.assign(measured=keep)


def _pct(values) -> dict[str, Optional[float]]:
    v = np.asarray(values, dtype=float)  # None -> NaN
    v = v[~np.isnan(v)]
    if v.size == 0:
        return {"mean": None, **{f"p{p}": None for p in PERCENTILES}}
    # One call for every percentile: one partition of the values (a run's ~1M inter-token gaps), same numbers.
    return {"mean": float(v.mean()), **{f"p{p}": float(x) for p, x in zip(PERCENTILES, np.percentile(v, PERCENTILES))}}


def prefix_cache_hit_rate(ok: pd.DataFrame) -> Optional[float]:
    """Prompt tokens served from the prefix cache over prompt tokens, over the requests whose server said (usage
    `prompt_tokens_details.cached_tokens`); None where none did."""
    if "cached_tokens" not in ok:
        return None
    known = ok[ok["cached_tokens"].notna()]
    prompt = float(known["prompt_tokens"].sum())
    return float(known["cached_tokens"].sum()) / prompt if len(known) and prompt > 0 else None


def aggregate(df: pd.DataFrame, ttft_slo: float, tpot_slo: float, duration_s: float,
              tpot_definition: str = "mean", sample_cis: Optional[dict[str, Any]] = None) -> dict[str, Any]:
    """The run's statistics over `df` (its measured requests); `sample_cis`: uncertainty.request_cis's."""
    ok = df[df["error"].isna()]
    out: dict[str, Any] = {
        "num_requests": int(len(df)), "num_ok": int(len(ok)), "num_errors": int(df["error"].notna().sum()),
        "duration_s": duration_s,
    }
    for c in ("ttft_s", "tpot_s", "e2e_s", "ntpot_s", "ttft_from_send_s", "e2e_from_send_s"):
        out[c] = _pct(ok[c])
    out["itl_s"] = _pct(np.concatenate([np.asarray(x, dtype=float) for x in ok["itl_s"]]) if len(ok) else [])
    out["dispatch_lateness_s"] = _pct(df["dispatch_lateness_s"].dropna())
    dur = max(duration_s, 1e-9)
    out["request_throughput"] = len(ok) / dur
    out["output_token_throughput"] = float(ok["output_tokens"].sum()) / dur
    out["total_token_throughput"] = float(ok["output_tokens"].sum() + ok["prompt_tokens"].sum()) / dur
    out["prefix_cache_hit_rate"] = prefix_cache_hit_rate(ok)
    met = slo_met(df, ttft_slo, tpot_slo, tpot_definition)
    out["slo_attainment"] = float(met.mean()) if len(df) else 0.0
    out["tpot_definitions"] = tpot_definitions(df, ttft_slo, tpot_slo, tpot_definition)
    out["goodput"] = float(met.sum()) / dur
    out["ci"] = U.request_cis(df, met, duration_s, sample=sample_cis)  # 95% intervals: analysis/uncertainty.py
    return out


def self_check(df: pd.DataFrame, workload_cfg, loop_lag: list[float], interarrival=None,
               arrivals: Optional[pd.Series] = None) -> dict[str, Any]:
    """Did the client keep up with its own schedule? Marks the run invalid (with reasons) if not.

    `interarrival`: the scipy distribution the schedule drew its gaps from (None: no KS test). `arrivals`: a mask
    of the rows the arrival process sent (a conversation's first turns; its later ones follow answers): the rate
    and the KS test read those only, dispatch lateness every row.
    """
    schedule_kind = workload_cfg.arrival
    timed = df if arrivals is None else df[arrivals]
    sends = np.sort(timed["send_s"].dropna().to_numpy())
    res: dict[str, Any] = {"reasons": []}
    late = df["dispatch_lateness_s"].dropna().to_numpy()
    res["dispatch_lateness_p99_s"] = float(np.percentile(late, 99)) if late.size else None
    res["event_loop_lag_p99_s"] = float(np.percentile(loop_lag, 99)) if loop_lag else None
    res["event_loop_lag_max_s"] = float(max(loop_lag)) if loop_lag else None
    if schedule_kind in ("poisson", "gamma", "constant") and sends.size > 2:
        achieved = (sends.size - 1) / max(sends[-1] - sends[0], 1e-9)
        res["target_rate"], res["achieved_rate"] = workload_cfg.rate, achieved
        # The schedule is a random draw: compare with the rate it actually drew too.
        sched = np.sort(timed["scheduled_s"].to_numpy())
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
