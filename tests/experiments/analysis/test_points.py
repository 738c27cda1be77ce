"""Points pool the valid runs of a configuration over seeds; goodput follows the rule and flags what it cannot
measure."""

from __future__ import annotations

import pandas as pd
import pytest

from experiments.analysis.points import goodput_from_curve, goodput_table, points
from experiments.sweep.aggregate import aggregate_sweep
from tests.helpers.sweep_dir import write_job


def test_goodput_on_a_non_monotone_curve_stops_at_the_first_failure():
    # 4 req/s fails, 6 passes again (noise): goodput is not 6, it is read between 2 and 4, and flagged.
    g = goodput_from_curve([1, 2, 4, 6, 8], [1.0, 0.95, 0.85, 0.92, 0.3], target=0.9)
    assert g["goodput_rate"] == pytest.approx(2 + (0.95 - 0.9) / (0.95 - 0.85) * 2)
    assert g["goodput_monotone"] is False and g["goodput_at_range_top"] is False


def test_goodput_at_the_top_of_the_range_is_a_lower_bound():
    g = goodput_from_curve([2, 4, 8], [1.0, 0.97, 0.93])
    assert g["goodput_rate"] == 8 and g["goodput_at_range_top"] is True and g["goodput_monotone"] is True


def test_goodput_when_even_the_lowest_rate_fails():
    g = goodput_from_curve([2, 4], [0.5, 0.95])
    assert g["goodput_rate"] == 0.0 and g["goodput_at_range_bottom"] is True and g["goodput_monotone"] is False


def _sweep(root):
    # unified: two seeds at each rate, passing at 2, failing at 4; semipd: its rate-4 run was disturbed.
    for seed in (0, 1):
        for rate, ttft in ((2.0, [0.1] * 20), (4.0, [0.1] * 10 + [2.0] * 10)):
            write_job(root, f"engine=unified,workload.rate={rate:g},workload.seed={seed}", "unified", rate,
                      ttft_s=ttft, overrides={"engine": "unified", "workload.rate": f"{rate:g}",
                                              "workload.seed": str(seed)},
                      slo_attainment=sum(t <= 1.0 for t in ttft) / 20, request_throughput=rate, num_requests=20,
                      num_errors=0, valid=True)
    for rate, valid in ((2.0, True), (4.0, False)):
        write_job(root, f"engine=semipd,workload.rate={rate:g},workload.seed=0", "semipd", rate, ttft_s=[0.1] * 20,
                  overrides={"engine": "semipd", "workload.rate": f"{rate:g}", "workload.seed": "0"},
                  slo_attainment=1.0, request_throughput=rate, num_requests=20, num_errors=0, valid=valid,
                  invalid_reasons="" if valid else "host interference: other processes used 60% of the job's cores")


def test_points_pool_seeds_and_set_invalid_runs_apart(tmp_path):
    _sweep(tmp_path)
    summary, requests = aggregate_sweep(tmp_path)
    pts = points(summary, requests, summary.attrs["swept"]).set_index(["engine", "rate"])
    assert pts.loc[("unified", 2.0), "n_seeds"] == 2 and pts.loc[("unified", 2.0), "n_requests"] == 40
    assert pts.loc[("unified", 4.0), "slo_attainment"] == 0.5
    assert pts.loc[("unified", 4.0), "slo_attainment_ci_low"] < 0.5 < pts.loc[("unified", 4.0), "slo_attainment_ci_high"]
    bad = pts.loc[("semipd", 4.0)]
    assert not bad["valid"] and bad["n_invalid"] == 1 and "host interference" in bad["invalid_reasons"]
    assert pts.loc[("semipd", 2.0), "valid"]
    # The files beside the summary.
    assert set(pd.read_csv(tmp_path / "points.csv")["engine"]) == {"unified", "semipd"}
    gp = pd.read_csv(tmp_path / "goodput.csv").set_index("engine")
    # semipd's only valid point is its lowest rate, which passes: a lower bound, flagged.
    assert gp.loc["semipd", "goodput_rate"] == 2.0 and bool(gp.loc["semipd", "goodput_at_range_top"])
    assert 2.0 <= gp.loc["unified", "goodput_rate"] < 4.0 and not bool(gp.loc["unified", "goodput_at_range_top"])


def test_goodput_table_of_searches_keeps_their_flags():
    summary = pd.DataFrame({"engine": ["a", "a", "b"], "rate": [1.0] * 3, "status": ["ok"] * 3,
                            "goodput_rate": [4.0, 5.0, 16.0], "goodput_at_range_top": [False, False, True],
                            "goodput_monotone": [True, True, True], "valid": [True, True, True]})
    gp = goodput_table(pd.DataFrame(), summary, swept=["engine"]).set_index("engine")
    assert gp.loc["a", "goodput_rate"] == 4.5 and gp.loc["a", "n_seeds"] == 2 and not gp.loc["a", "goodput_at_range_top"]
    assert gp.loc["b", "goodput_at_range_top"]


def test_a_one_run_point_takes_its_jobs_own_mean_intervals():
    """A job's mean-latency intervals (request_cis over its measured requests) are what the point would bootstrap
    again from the same rows: reading them is the same number, and a job without them is bootstrapped."""
    import numpy as np

    from experiments.analysis import uncertainty as U
    from experiments.analysis.points import _job_mean_cis

    rng = np.random.default_rng(2)
    df = pd.DataFrame({"ttft_s": rng.lognormal(-2, 1, 400), "tpot_s": rng.lognormal(-4, 0.5, 400),
                       "e2e_s": rng.lognormal(1, 0.5, 400), "output_tokens": rng.integers(2, 300, 400),
                       "error": [None] * 400, "met": rng.random(400) < 0.9})
    job = U.request_cis(df, df["met"], 100.0)
    row = pd.Series({"status": "ok", **{f"mean_{c}_ci_{e}": job[f"{c}.mean"][i] for c in U.LATENCIES
                                         for i, e in enumerate(("low", "high"))}})
    U._MEAN_CIS.clear()
    assert U.point_stats([df], [100.0], known=_job_mean_cis(row)) == U.point_stats([df], [100.0])
    assert _job_mean_cis(pd.Series({**row, "status": "failed"})) == {}
    assert _job_mean_cis(row.drop("mean_ttft_s_ci_low")).keys() == {"mean_tpot_s", "mean_e2e_s"}
