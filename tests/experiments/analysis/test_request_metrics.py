"""Per-request metrics on hand-built rows: derived latencies, SLO attainment, aggregates, the self-check."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest

from experiments.analysis.request_metrics import (
    aggregate,
    derive,
    measured_mask,
    self_check,
    slo_met,
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
