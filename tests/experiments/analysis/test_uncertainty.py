"""95% intervals: they cover what they claim on synthetic data, shrink with more requests, never collapse at
100% attainment, and widen when seeds disagree."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest

from experiments.analysis import uncertainty as U


def _run(n: int, seed: int, scale: float = 0.1, miss: float = 0.1) -> pd.DataFrame:
    """n requests with exponential latencies; a fraction `miss` misses its SLO."""
    rng = np.random.default_rng(seed)
    return pd.DataFrame({"ttft_s": rng.exponential(scale, n), "tpot_s": rng.exponential(scale / 10, n),
                         "e2e_s": rng.exponential(10 * scale, n), "output_tokens": rng.integers(1, 50, n),
                         "error": [None] * n, "met": (rng.random(n) >= miss).astype(float)})


def _width(lo_hi) -> float:
    lo, hi = lo_hi
    return hi - lo


def test_intervals_shrink_with_more_requests():
    widths = {}
    for n in (50, 200, 800):
        df = _run(n, seed=1)
        ci = U.request_cis(df, df["met"].astype(bool), duration_s=n / 4.0)
        widths[n] = {k: _width(ci[k]) for k in ("slo_attainment", "ttft_s.p50", "ttft_s.p90", "e2e_s.mean",
                                                "request_throughput")}
    for k in widths[50]:
        assert widths[50][k] > widths[200][k] > widths[800][k], (k, widths)
    # Roughly 1/sqrt(n): four times the requests, about half the width.
    assert widths[800]["ttft_s.p90"] < 0.7 * widths[200]["ttft_s.p90"]


def test_point_stats_shrink_with_more_requests_and_seeds():
    few = U.point_stats([_run(60, seed=0)], [15.0])
    many = U.point_stats([_run(60 * 8, seed=0)], [120.0])
    seeds = U.point_stats([_run(240, seed=s) for s in range(4)], [60.0] * 4)
    assert (few["n_requests"], few["n_seeds"]) == (60, 1) and (seeds["n_requests"], seeds["n_seeds"]) == (960, 4)
    for k in ("p90_ttft_s", "mean_e2e_s", "slo_attainment"):
        w_few = few[f"{k}_ci_high"] - few[f"{k}_ci_low"]
        assert many[f"{k}_ci_high"] - many[f"{k}_ci_low"] < w_few
        assert seeds[f"{k}_ci_high"] - seeds[f"{k}_ci_low"] < w_few
        assert few[f"{k}_ci_low"] <= few[k] <= few[f"{k}_ci_high"]


def test_quantile_interval_covers_the_true_quantile():
    rng = np.random.default_rng(7)
    true_p90 = -math.log(0.1)  # of a unit exponential
    hits = sum(lo <= true_p90 <= hi for lo, hi in (U.quantile_ci(rng.exponential(size=100), 0.9)
                                                   for _ in range(400)))
    assert hits / 400 >= 0.93
    # P99 of 100 requests cannot be bounded above: said, not faked.
    assert U.quantile_ci(rng.exponential(size=100), 0.99)[1] == math.inf


def test_attainment_at_100_percent_is_not_certain():
    lo, hi = U.wilson(60, 60)
    assert hi == pytest.approx(1.0) and 0.9 < lo < 0.97
    assert all(math.isnan(x) for x in U.wilson(0, 0))  # no requests, no interval


def test_seeds_that_disagree_widen_the_interval():
    calm = [_run(200, seed=s, miss=0.1) for s in range(3)]
    apart = [_run(200, seed=s, miss=m) for s, m in zip(range(3), (0.02, 0.1, 0.4))]
    a, b = U.point_stats(calm, [50.0] * 3), U.point_stats(apart, [50.0] * 3)
    assert b["slo_attainment_ci_high"] - b["slo_attainment_ci_low"] > \
        2 * (a["slo_attainment_ci_high"] - a["slo_attainment_ci_low"])


def test_the_cluster_quantile_interval_is_the_pooled_bootstrap():
    """Weighing sorted gaps by how often their group was drawn gives what pooling the drawn groups gives."""
    from experiments.analysis import uncertainty as U

    def pooled(groups, q, n_boot, conf=0.95, seed=0):
        groups = [np.asarray(g, dtype=float) for g in groups if len(g)]
        rng = U._rng(seed)
        reps = np.empty(n_boot)
        for b in range(n_boot):
            pick = rng.integers(0, len(groups), len(groups))
            reps[b] = np.percentile(np.concatenate([groups[i] for i in pick]), q * 100)
        return U._pct_interval(reps, conf)

    rng = np.random.default_rng(3)
    for n_groups, longest in ((3, 2), (40, 30), (400, 200)):
        groups = [rng.exponential(1.0, rng.integers(1, longest + 1)).round(3) for _ in range(n_groups)]
        for q in (0.5, 0.9, 0.99):
            assert U.cluster_quantile_ci(groups, q, n_boot=100) == pytest.approx(pooled(groups, q, 100), rel=1e-12)
        # chunks of a few gaps: ranks land in every chunk of the window and at its edges
        assert U.cluster_quantile_cis(groups, (0.5, 0.9, 0.99), n_boot=100, chunk=3) == \
            U.cluster_quantile_cis(groups, (0.5, 0.9, 0.99), n_boot=100)
    # two long groups far apart: a replicate that draws one of them twice moves every rank out of the window
    groups = [rng.exponential(1.0, 3000), 10 + rng.exponential(1.0, 3000)]
    for q in (0.5, 0.9):
        assert U.cluster_quantile_cis(groups, [q], n_boot=50, chunk=64)[0] == pytest.approx(pooled(groups, q, 50), rel=1e-12)


def test_several_quantiles_at_once_are_each_quantile_alone():
    rng = np.random.default_rng(5)
    groups = [rng.exponential(1.0, rng.integers(1, 60)).round(2) for _ in range(300)]  # ties on purpose
    qs = (0.5, 0.9, 0.99)
    assert U.cluster_quantile_cis(groups, qs, n_boot=80) == [U.cluster_quantile_ci(groups, q, n_boot=80) for q in qs]


def test_a_remembered_mean_interval_is_the_one_computed_afresh():
    v = np.random.default_rng(1).lognormal(0, 1, 500)
    U._MEAN_CIS.clear()
    fresh = U.bootstrap_ci(v)
    assert U.bootstrap_ci(v.copy()) == fresh and len(U._MEAN_CIS) == 1  # same values: read back
    assert U.bootstrap_ci(v, seed=1) != fresh  # another seed (or other values) is another interval
    assert U.bootstrap_ci(v[:-1]) != fresh and len(U._MEAN_CIS) == 3


def test_the_quantile_bootstrap_on_a_simulations_gaps_is_the_pooled_one():
    """A simulated run's gaps take a few thousand distinct values (one per decode batch shape): runs of ties cross
    the windows' edges, where only a partition, not a sort, has put the gaps."""
    from experiments.analysis import uncertainty as U

    rng = np.random.default_rng(11)
    levels = rng.uniform(0.01, 0.05, 40)
    groups = [levels[rng.integers(0, 40, rng.integers(1, 120))] for _ in range(600)]
    values = np.concatenate(groups)
    owner = np.repeat(np.arange(len(groups)), [len(g) for g in groups])
    spans = [(1000, 5000), (20000, 26000), (30000, values.size)]
    order = U._window_order(values, spans)
    ref = np.sort(values)
    for lo, hi in spans:  # sorted inside each span, the right set before it
        assert np.array_equal(values[order[lo:hi]], ref[lo:hi])
        assert np.array_equal(np.sort(values[order[:lo]]), ref[:lo])
    # and the intervals: every replicate's quantiles as a sort of the whole array gives them
    whole = np.argsort(values, kind="stable")
    for q in (0.5, 0.9, 0.99):
        rng_b = U._rng(0)
        reps = []
        for _ in range(60):
            w = np.bincount(rng_b.integers(0, len(groups), len(groups)), minlength=len(groups))
            reps.append(np.percentile(np.repeat(values[whole], w[owner[whole]]), q * 100))
        assert U.cluster_quantile_cis(groups, [q], n_boot=60, chunk=50)[0] == \
            pytest.approx(U._pct_interval(np.array(reps), 0.95), rel=1e-12)
