"""Server metrics over a load: iteration means count each iteration once, on the load's clock."""

import json

import pandas as pd
import pytest

from experiments.analysis.server_metrics import iteration_means, job_timeseries


def write_job(tmp_path, t0=100.0):
    rows = []
    # Cumulative histogram samples: decode iterations of 10 ms during the load (t = 0..10 s), then 2 ms ones
    # in the drain (t = 10..20 s); prefill only from t = 5 s (no series before: it had not run yet).
    n = s = 0.0
    pn = ps = 0.0
    for t in range(0, 21):
        if 0 < t <= 10:
            n, s = n + 100, s + 100 * 0.010
        elif t > 10:
            n, s = n + 500, s + 500 * 0.002
        rows += [{"time_s": t, "metric": "iterations", "labels": 'phase="decode"', "value": n},
                 {"time_s": t, "metric": "iteration_time_sum_s", "labels": 'phase="decode"', "value": s}]
        if t >= 5:
            pn, ps = pn + 2, ps + 2 * 0.05
            rows += [{"time_s": t, "metric": "iterations", "labels": 'phase="prefill"', "value": pn},
                     {"time_s": t, "metric": "iteration_time_sum_s", "labels": 'phase="prefill"', "value": ps}]
        rows.append({"time_s": t, "metric": "requests_running", "labels": "", "value": 3.0})
    df = pd.DataFrame(rows).assign(monotonic_s=lambda f: f["time_s"] + t0)
    df.to_parquet(tmp_path / "server_metrics.parquet", index=False)
    (tmp_path / "summary.json").write_text(json.dumps({"t0_monotonic": t0}))
    return tmp_path


def test_iteration_means_over_the_load_window_count_each_iteration_once(tmp_path):
    jd = write_job(tmp_path)
    during = iteration_means(jd, 0.0, 10.0)
    assert during["decode"] == pytest.approx(0.010) and during["prefill"] == pytest.approx(0.05)
    # Over the whole run the drain's many short iterations pull the mean down, weighted by count.
    assert iteration_means(jd, 0.0, 20.0)["decode"] == pytest.approx((1000 * 0.010 + 5000 * 0.002) / 6000)


def test_series_are_on_the_loads_clock_and_nothing_sampled_is_none(tmp_path):
    ts = job_timeseries(write_job(tmp_path))
    assert (ts["clock"] == "load").all() and ts["time_s"].iloc[0] == 0
    assert job_timeseries(tmp_path / "missing") is None
    assert iteration_means(tmp_path / "missing", 0, 1) == {}
