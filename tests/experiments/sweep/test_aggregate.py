"""Sweep aggregation on a small synthetic sweep directory: one row per job (failed ones too), every request
tagged with its job, and the terminal table."""

from __future__ import annotations

import math

import pandas as pd

from experiments.sweep.aggregate import aggregate_sweep, format_table, job_dirs
from tests.helpers.sweep_dir import write_job


def _sweep(root):
    write_job(root, "engine=unified,slo=tight,workload.rate=2", "unified", 2.0, ttft_s=[0.1, 0.2],
              overrides={"engine": "unified", "slo": "tight", "workload.rate": "2"}, slo=(0.5, 0.05),
              slo_attainment=1.0, p90_ttft_s=0.19, p90_tpot_s=0.012, mean_e2e_s=0.5, request_throughput=2.0,
              num_errors=0)
    write_job(root, "engine=semipd,slo=tight,workload.rate=4", "semipd", 4.0, ttft_s=[0.3, 0.4, 0.9],
              overrides={"engine": "semipd", "slo": "tight", "workload.rate": "4"}, slo=(0.5, 0.05),
              slo_attainment=2 / 3, p90_ttft_s=0.8, p90_tpot_s=0.02, mean_e2e_s=1.25, request_throughput=3.5,
              num_errors=0)
    write_job(root, "engine=disagg,slo=tight,workload.rate=2", "disagg", 2.0, status="failed",
              overrides={"engine": "disagg", "slo": "tight", "workload.rate": "2"})
    # A goodput search's probe folders are not jobs of the sweep.
    write_job(root / "engine=semipd,slo=tight,workload.rate=4" / "probes", "rate1.0000_seed0", "semipd", 1.0,
              ttft_s=[0.1])


def test_job_dirs_leave_out_probes(tmp_path):
    _sweep(tmp_path)
    assert [d.name for d in job_dirs(tmp_path)] == ["engine=disagg,slo=tight,workload.rate=2",
                                                   "engine=semipd,slo=tight,workload.rate=4",
                                                   "engine=unified,slo=tight,workload.rate=2"]


def test_aggregate_sweep(tmp_path):
    _sweep(tmp_path)
    summary, requests = aggregate_sweep(tmp_path)

    assert list(summary["engine"]) == ["disagg", "semipd", "unified"]
    assert list(summary["status"]) == ["failed", "ok", "ok"]
    assert summary.attrs["swept"] == ["engine", "slo", "workload.rate"]
    assert list(summary["workload.rate"]) == [2, 4, 2]  # override strings parsed back to numbers
    assert list(summary["slo"]) == ["tight"] * 3
    assert list(summary["slo_ttft_s"]) == [1.0, 0.5, 0.5] and list(summary["slo_tpot_s"]) == [0.1, 0.05, 0.05]
    assert summary.loc[0, "error"] == "ServerStartError: boom" and math.isnan(summary.loc[0, "slo_attainment"])
    assert not {"traceback", "overrides"} & set(summary.columns)

    assert requests.groupby("job").size().to_dict() == {"engine=semipd,slo=tight,workload.rate=4": 3,
                                                        "engine=unified,slo=tight,workload.rate=2": 2}
    semipd = requests[requests["engine"] == "semipd"]
    assert list(semipd["ttft_s"]) == [0.3, 0.4, 0.9] and list(semipd["request_id"]) == [0, 1, 2]
    assert (semipd["rate"] == 4.0).all() and (semipd["workload.rate"] == 4).all() and (semipd["slo"] == "tight").all()
    assert (requests["status"] == "ok").all() and (requests["slo_ttft_s"] == 0.5).all()

    on_disk = pd.read_csv(tmp_path / "summary.csv")
    assert list(on_disk["job"]) == list(summary["job"]) and list(on_disk["status"]) == list(summary["status"])
    assert len(pd.read_parquet(tmp_path / "requests.parquet")) == 5


def test_aggregate_of_an_empty_sweep(tmp_path):
    summary, requests = aggregate_sweep(tmp_path)
    assert summary.empty and requests.empty
    assert (tmp_path / "summary.csv").is_file() and not (tmp_path / "requests.parquet").exists()
    assert format_table(summary) == "(no jobs)"


def test_format_table(tmp_path):
    _sweep(tmp_path)
    summary, _ = aggregate_sweep(tmp_path)
    lines = format_table(summary, summary.attrs["swept"]).splitlines()
    # engine, the swept keys that vary but the rate (a column already; `slo` is one value here, so no column),
    # then the headline columns in milliseconds / %.
    assert lines[0].split() == ["engine", "rate", "status", "slo_attainment", "p90_ttft_ms", "p90_tpot_ms",
                                "mean_e2e_ms", "request_throughput", "num_errors"]
    rows = [line.split() for line in lines[1:]]
    assert [r[0] for r in rows] == ["disagg", "semipd", "unified"]
    assert rows[1][1:8] == ["4.0", "ok", "66.7", "800.0", "20.0", "1250.0", "3.5"]
    assert rows[2][3:6] == ["100.0", "190.0", "12.0"]
    assert rows[0][2:4] == ["failed", "NaN"]
