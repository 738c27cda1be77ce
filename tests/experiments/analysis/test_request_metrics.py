"""Per-request metrics on hand-built rows: derived latencies, SLO attainment, aggregates, the self-check."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest

from experiments.analysis.request_metrics import (
    BACKLOG_GROWTH_MIN_REQUESTS,
    TPOT_DEFINITIONS,
    aggregate,
    derive,
    measured_mask,
    self_check,
    slo_met,
    steady_state,
    tpot_definitions,
)
from experiments.loadgen.arrivals import interarrival_distribution
from tests.helpers.experiment_configs import workload_cfg

NAN = math.nan


def _raw():
    # 0: four tokens 0.1 s apart after a 0.1 s TTFT, sent 2 ms late; 1: HTTP 500; 2: a one-token answer.
    return pd.DataFrame({
        "scheduled_s": [0.0, 0.5, 1.0], "send_s": [0.002, 0.5, 1.0], "first_token_s": [0.102, NAN, 1.05],
        "finish_s": [0.402, 0.51, 1.05], "token_times_s": [[0.102, 0.202, 0.302, 0.402], [], [1.05]],
        "output_tokens": [4, 0, 1], "prompt_tokens": [10, 10, 10], "error": [None, "HTTP 500: boom", None]})


def test_derive():
    df = derive(_raw())
    assert df.loc[0, "ttft_s"] == pytest.approx(0.102) and df.loc[0, "ttft_from_send_s"] == pytest.approx(0.1)
    assert df.loc[0, "e2e_s"] == pytest.approx(0.402) and df.loc[0, "tpot_s"] == pytest.approx(0.1)
    assert df.loc[0, "ntpot_s"] == pytest.approx(0.402 / 4)
    assert df.loc[0, "itl_s"] == pytest.approx([0.1, 0.1, 0.1])
    assert list(df["dispatch_lateness_s"]) == pytest.approx([0.002, 0.0, 0.0])
    assert df.loc[[1], ["ttft_s", "e2e_s", "tpot_s"]].isna().all(axis=None)  # a failed request has no latencies
    assert math.isnan(df.loc[2, "tpot_s"]) and df.loc[2, "ttft_s"] == pytest.approx(0.05)
    from_send = derive(_raw(), measure_from="send")
    assert from_send.loc[0, "ttft_s"] == pytest.approx(0.1) and from_send.loc[0, "e2e_s"] == pytest.approx(0.4)


def test_slo_met_and_aggregate():
    df = derive(_raw())
    assert list(slo_met(df, ttft_s=0.2, tpot_s=0.15)) == [True, False, True]
    assert list(slo_met(df, ttft_s=0.2, tpot_s=0.05)) == [False, False, True]  # no TPOT to miss in one token
    assert list(slo_met(df, ttft_s=0.06, tpot_s=1.0)) == [False, False, True]
    a = aggregate(df, 0.2, 0.15, duration_s=2.0)
    assert (a["num_requests"], a["num_ok"], a["num_errors"]) == (3, 2, 1)
    assert a["slo_attainment"] == pytest.approx(2 / 3) and a["goodput"] == pytest.approx(1.0)
    assert a["request_throughput"] == pytest.approx(1.0) and a["output_token_throughput"] == pytest.approx(2.5)
    assert a["total_token_throughput"] == pytest.approx((5 + 20) / 2.0)
    assert a["ttft_s"]["mean"] == pytest.approx((0.102 + 0.05) / 2) and a["tpot_s"]["p50"] == pytest.approx(0.1)
    assert a["itl_s"]["p99"] == pytest.approx(0.1)
    empty = aggregate(df.iloc[:0], 0.2, 0.15, duration_s=0.0)
    assert empty["slo_attainment"] == 0.0 and empty["ttft_s"]["p90"] is None


def test_measured_window():
    df = pd.DataFrame({"scheduled_s": np.arange(10.0)})
    assert list(df[measured_mask(df, 2.0, 3.0)]["scheduled_s"]) == [2, 3, 4, 5, 6]


def _sent_on_time(gaps, lateness=0.0):
    sched = np.concatenate([[0.0], np.cumsum(gaps)])
    return pd.DataFrame({"scheduled_s": sched, "send_s": sched + lateness, "dispatch_lateness_s": lateness})


def test_self_check():
    cfg = workload_cfg(arrival="poisson", rate=10.0, seed=1)
    dist = interarrival_distribution(cfg)
    gaps = dist.rvs(size=400, random_state=np.random.default_rng(0))
    ok = self_check(_sent_on_time(gaps), cfg, [0.001] * 10, dist)
    assert ok["valid"] and ok["reasons"] == [] and ok["ks_pvalue"] > 0.001
    assert ok["achieved_rate"] == pytest.approx(ok["scheduled_rate"])

    late = self_check(_sent_on_time(gaps, lateness=0.02), cfg, [], dist)
    assert not late["valid"] and late["reasons"] == ["p99 dispatch lateness 20.0 ms > 10 ms"]

    bunched = np.full(400, 0.1)  # a constant gap is not exponential
    ks = self_check(_sent_on_time(bunched), cfg, [], dist)
    assert not ks["valid"] and ks["reasons"][0].startswith("inter-arrival times fail the KS test against poisson")
    assert "ks_pvalue" not in self_check(_sent_on_time(bunched), cfg, [], None)  # no distribution, no KS test


def test_warmup_requests_are_saved_but_not_counted():
    # Schedule order, not row order; an unsent request (no schedule) counts last.
    df = pd.DataFrame({"scheduled_s": [3.0, 0.0, 2.0, np.nan, 1.0]})
    assert list(measured_mask(df, warmup_requests=2)) == [True, False, True, True, False]
    assert measured_mask(df).all()
    assert list(measured_mask(df, warmup_s=1.5, warmup_requests=1)) == [True, False, True, False, False]


# -- TPOT definitions ------------------------------------------------------------------------------------------


def _stall_rows():
    """TPOT SLO 0.1 s. 0: ten tokens 50 ms apart. 1: its first token, a 0.5 s stall, then eight tokens 10 ms apart
    (mean TPOT 64 ms: meets the mean, not its longest gap). 2: a one-token answer. 3: five tokens sent whole (no
    per-token times). 4: failed."""
    steady = [0.1 + 0.05 * i for i in range(10)]
    stall = [0.1, 0.6] + [0.6 + 0.01 * i for i in range(1, 9)]
    return derive(pd.DataFrame({
        "scheduled_s": [0.0, 0.0, 0.0, 0.0, 0.0], "send_s": [0.0] * 5,
        "first_token_s": [0.1, 0.1, 0.1, 0.2, NAN], "finish_s": [steady[-1], stall[-1], 0.1, 0.2, 0.3],
        "token_times_s": [steady, stall, [0.1], [0.2], []], "output_tokens": [10, 10, 1, 5, 0],
        "prompt_tokens": [10] * 5, "error": [None, None, None, None, "HTTP 500: boom"]}))


def test_each_tpot_definition_on_hand_made_token_times():
    df = _stall_rows()
    assert df.loc[0, ["tpot_s", "tpot_p90_itl_s", "tpot_p99_itl_s", "tpot_max_itl_s", "tpot_first_to_second_s"]] \
        .tolist() == pytest.approx([0.05] * 5)
    gaps = np.array([0.5] + [0.01] * 8)
    assert df.loc[1, "tpot_s"] == pytest.approx(gaps.sum() / 9)
    assert df.loc[1, "tpot_p90_itl_s"] == pytest.approx(np.percentile(gaps, 90))  # 0.108: one stall in nine gaps
    assert df.loc[1, "tpot_p99_itl_s"] == pytest.approx(np.percentile(gaps, 99))
    assert df.loc[1, "tpot_max_itl_s"] == pytest.approx(0.5) and df.loc[1, "tpot_first_to_second_s"] == pytest.approx(0.5)
    assert df.loc[2:4, list(TPOT_DEFINITIONS.values())[1:]].isna().all(axis=None)  # no gap: none, unknown, failed

    met = {d: list(slo_met(df, ttft_s=1.0, tpot_s=0.1, definition=d)) for d in TPOT_DEFINITIONS}
    assert met["mean"] == [True, True, True, True, False]  # the stalled request counts as good
    for d in ("p90_itl", "p99_itl", "max_itl", "first_to_second"):
        # it does not; the one sent whole has no gaps to judge, the one-token answer no TPOT to miss
        assert met[d] == [True, False, True, False, False], d

    t = tpot_definitions(df, 1.0, 0.1, "max_itl")
    assert t["chosen"] == "max_itl" and t["slo_attainment"]["mean"] == pytest.approx(4 / 5)
    assert t["slo_attainment"]["max_itl"] == pytest.approx(2 / 5)
    assert (t["stalled_requests"], t["stalled_fraction"], t["requests_without_token_times"]) == (1, 0.2, 1)
    assert t["token_time_coverage"] == pytest.approx(21 / 25)


def test_the_chosen_definition_sets_attainment_and_goodput():
    df = _stall_rows()
    mean, strict = (aggregate(df, 1.0, 0.1, duration_s=2.0, tpot_definition=d) for d in ("mean", "max_itl"))
    assert (mean["slo_attainment"], mean["goodput"]) == (pytest.approx(4 / 5), pytest.approx(2.0))
    assert (strict["slo_attainment"], strict["goodput"]) == (pytest.approx(2 / 5), pytest.approx(1.0))
    assert mean["tpot_definitions"]["slo_attainment"] == strict["tpot_definitions"]["slo_attainment"]


def test_a_run_without_per_token_times_says_none_instead_of_guessing():
    df = _stall_rows().iloc[[2, 3]]  # a one-token answer and one sent whole
    t = tpot_definitions(df, 1.0, 0.1)
    assert t["slo_attainment"]["mean"] == 1.0
    assert all(t["slo_attainment"][d] is None for d in TPOT_DEFINITIONS if d != "mean")
    assert t["stalled_requests"] is None and t["stalled_fraction"] is None


def test_rows_saved_before_the_gap_columns_are_judged_from_their_token_times():
    old = _stall_rows().drop(columns=list(TPOT_DEFINITIONS.values())[1:])
    assert list(slo_met(old, 1.0, 0.1, "max_itl")) == [True, False, True, False, False]


def test_an_unknown_definition_names_the_key_and_the_valid_values():
    with pytest.raises(ValueError, match=r"slo.tpot_definition='p95_itl': expected one of mean, p90_itl, p99_itl, "
                                         r"max_itl, first_to_second"):
        slo_met(_stall_rows(), 1.0, 0.1, "p95_itl")


# -- steady state ----------------------------------------------------------------------------------------------


def _load(service_s, n=100, gap_s=0.1):
    """`n` requests `gap_s` apart, request i served in service_s(i) seconds; the first five are the warm-up."""
    arrival = np.arange(n) * gap_s
    finish = arrival + np.array([service_s(i) for i in range(n)])
    return pd.DataFrame({"scheduled_s": arrival, "send_s": arrival, "finish_s": finish,
                         "measured": np.arange(n) >= 5})


def test_a_flat_run_reached_steady_state():
    df = _load(lambda i: 0.3)
    s = steady_state(df, pd.Series(True, index=df.index[5:]))
    assert s["steady_state"] is True and s["reasons"] == []
    assert s["first_half"]["mean_in_system"] == pytest.approx(3.0, abs=0.1)
    assert s["second_half"]["mean_in_system"] == pytest.approx(3.0, abs=0.1)
    assert abs(s["backlog_growth"]) < 0.1 and s["first_half"]["slo_attainment"] == 1.0
    assert s["first_half"]["requests"] + s["second_half"]["requests"] == 95


def test_a_growing_backlog_is_no_steady_state():
    df = _load(lambda i: 0.3 + 0.05 * i)  # each request waits longer than the one before: a queue that grows
    s = steady_state(df, pd.Series(True, index=df.index[5:]))
    assert s["steady_state"] is False and s["backlog_growth"] > BACKLOG_GROWTH_MIN_REQUESTS
    assert "requests in the system grew" in s["reasons"][0]


def test_falling_attainment_alone_is_no_steady_state_and_too_few_requests_no_verdict():
    df = _load(lambda i: 0.3)
    met = pd.Series(df.index[5:] < 60, index=df.index[5:])  # most of the second half (52-99) misses
    s = steady_state(df, met)
    assert s["steady_state"] is False and s["reasons"] == ["attainment fell from 100% to 17% (first vs second half)"]
    few = _load(lambda i: 0.3, n=12)
    assert steady_state(few, pd.Series(True, index=few.index[5:]))["steady_state"] is None


def _conversations(n_conv: int, conv_gap_s: float, turns: int, turn_s: float):
    """`n_conv` conversations started `conv_gap_s` apart, each `turns` turns `turn_s` apart (answer + think)."""
    rows = [{"scheduled_s": c * conv_gap_s + k * turn_s, "turn": k, "conversation_id": c}
            for c in range(n_conv) for k in range(turns)]
    df = pd.DataFrame(rows)
    return df.assign(send_s=df["scheduled_s"], finish_s=df["scheduled_s"] + 0.1, measured=True)


def test_a_multi_turn_run_is_measured_where_it_offered_its_rate_and_flagged_where_it_never_did():
    from types import SimpleNamespace

    from experiments.analysis.request_metrics import conversation_plateau, mark_measured

    # 3 turns per conversation, one every 0.3 s: 10 req/s offered. Conversations span 13.4 s (turns 6.7 s apart):
    # started over 60 s, the rate is full from 13.4 s to the last start; started over 3 s, it never is.
    long_run = _conversations(200, 0.3, 3, 6.7)
    assert conversation_plateau(long_run) == pytest.approx((13.4, 59.7))
    s = steady_state(long_run, pd.Series(True, index=long_run.index), offered_rate=10.0)
    assert s["offered_rate_reached"] is True and s["sent_rate_on_plateau"] == pytest.approx(10.0, rel=0.03)
    lcfg = SimpleNamespace(warmup_s=0.0, cooldown_s=0.0, warmup_requests=0)
    kept = mark_measured(long_run, lcfg, conversations=True)
    assert kept["measured"].sum() < len(kept) and kept.loc[kept["measured"], "scheduled_s"].between(13.4, 59.7).all()
    assert mark_measured(long_run, lcfg)["measured"].all()  # single-turn rules otherwise
    short = _conversations(10, 0.3, 3, 6.7)
    s = steady_state(short, pd.Series(True, index=short.index), offered_rate=10.0)
    assert s["offered_rate_reached"] is False and s["steady_state"] is False
    assert s["reasons"][0].startswith("conversations outlast the time over which they start")
    assert mark_measured(short, lcfg, conversations=True)["measured"].all()  # no plateau: the whole run, flagged
    assert "offered_rate_reached" not in steady_state(short, pd.Series(True, index=short.index))


def test_gap_columns_are_each_requests_own_numpy_statistics():
    """The vectorised gaps (one np.diff over every request, percentiles by segment) give what a loop of
    np.percentile per request gives, to the last bit; rows without two times get NaN."""
    from experiments.analysis.request_metrics import TPOT_DEFINITIONS, derive, gap_columns

    rng = np.random.default_rng(0)
    for _ in range(50):
        n = int(rng.integers(1, 25))
        times = [np.cumsum(rng.exponential(0.05, rng.integers(0, 40))).round(int(rng.integers(2, 6))).tolist()
                 if rng.random() > 0.15 else None for _ in range(n)]
        df = pd.DataFrame({"token_times_s": pd.Series(times, dtype=object), "output_tokens": [5] * n})
        got = gap_columns(df)
        for i, t in enumerate(times):
            if t is None or len(t) < 2:
                assert got.iloc[i].isna().all()
                continue
            g = np.diff(np.asarray(t, dtype=float))
            want = [*np.percentile(g, [90, 99]), g.max(), g[0]]
            assert got.iloc[i].tolist() == want, (t, got.iloc[i].tolist(), want)
    assert list(got.columns) == [c for d, c in TPOT_DEFINITIONS.items() if d != "mean"]
    rows = pd.DataFrame({"scheduled_s": [0.0, 0.1, 0.2], "send_s": [0.0, 0.1, 0.2], "first_token_s": [0.5, 0.6, 0.7],
                         "finish_s": [0.9, 0.6, 1.0], "output_tokens": [3, 1, 2], "error": [None, None, None],
                         "token_times_s": [[0.5, 0.7, 0.9], [0.6], [0.7, 1.0]]})
    itl = derive(rows)["itl_s"]
    assert [list(x) for x in itl] == [list(np.diff([0.5, 0.7, 0.9])), [], list(np.diff([0.7, 1.0]))]
