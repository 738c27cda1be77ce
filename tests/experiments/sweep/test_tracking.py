"""W&B tracking, read back from the offline runs it writes: typed tables, the experiment as the group, the sweep
as a tag, the server's time series with their timestamps, and every run of a sweep in one directory."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from experiments.sweep.config import WandbConfig
from experiments.sweep.tracking import flatten, log_job, log_sweep, table_data
from semipd_engine.config import freeze
from tests.helpers.wandb_offline import read_run

ROOT = Path(__file__).resolve().parents[3]
# Set explicitly: the test environment's WANDB_MODE (disabled) must not decide for these tests.
OFFLINE = freeze(WandbConfig, {"mode": "offline", "tags": ["mine"]})


def test_flatten():
    summary = {"status": "ok", "rate": 2.0, "valid": True, "error": None, "num": 3,
               "aggregates": {"ttft_s": {"p50": 0.1, "p90": 0.3}, "goodput": 1.5, "empty": {}},
               "overrides": {"engine": "unified"}, "probes": [{"rate": 1.0}], "reasons": ["late"]}
    assert flatten(summary) == {"status": "ok", "rate": 2.0, "valid": True, "error": None, "num": 3,
                                "aggregates/ttft_s/p50": 0.1, "aggregates/ttft_s/p90": 0.3,
                                "aggregates/goodput": 1.5, "overrides/engine": "unified"}
    assert flatten({"a": {"b": 1}}, prefix="job/") == {"job/a/b": 1}


def test_disabled_mode_logs_nothing(tmp_path):
    off = freeze(WandbConfig, {"mode": "disabled"})
    assert log_job(off, str(tmp_path), str(tmp_path), "job", "exp", "sweep", "unified", {}, {"status": "ok"},
                   None) is None
    assert log_sweep(off, str(tmp_path), pd.DataFrame({"engine": ["unified"]}), [], "exp") is None
    assert not any(tmp_path.iterdir())


def test_table_columns_keep_their_types():
    df = pd.DataFrame({"rate": [2.0, np.nan, 4.5], "n": np.array([1, 2, 3], dtype="int64"),
                       "nullable": pd.array([1, None, 3], dtype="Int64"), "valid": [True, np.nan, False],
                       "ok": np.array([True, False, True]), "engine": ["unified", None, "semipd"],
                       "mixed": [1, "two", 3.0], "cores": [[0, 1], None, [2]], "extra": [{"a": 1}, None, {}],
                       "empty": [None, None, None], "swept": [2, 4.5, np.nan]})
    columns, rows = table_data(df)
    assert columns == list(df.columns)
    col = {c: [r[i] for r in rows] for i, c in enumerate(columns)}
    assert col["rate"] == [2.0, None, 4.5] and col["n"] == [1, 2, 3] and col["nullable"] == [1, None, 3]
    assert col["valid"] == [True, None, False] and col["ok"] == [True, False, True]
    assert col["engine"] == ["unified", None, "semipd"] and col["mixed"] == ["1", "two", "3.0"]
    assert col["cores"] == ["[0, 1]", None, "[2]"] and col["extra"] == ['{"a": 1}', None, "{}"]
    assert col["empty"] == [None, None, None] and col["swept"] == [2, 4.5, None]
    for c in ("n", "nullable", "ok", "valid"):  # Python values, not numpy ones (W&B types by Python type)
        assert all(type(v) in (int, bool, type(None)) for v in col[c]), c


def _job_dir(root: Path) -> Path:
    """A finished semi-PD job as the harness leaves it: its requests, summary, server samples and partition log."""
    jd = root / "engine=semipd,workload.rate=4"
    jd.mkdir(parents=True)
    (jd / "job.json").write_text(json.dumps({"status": "ok", "engine": "semipd", "rate": 4.0, "backend": "real",
                                             "server_ready_monotonic": 99.0,
                                             "slo": {"ttft_s": 1.0, "tpot_s": 0.1}}))
    (jd / "summary.json").write_text(json.dumps({"t0_monotonic": 100.0}))
    pd.DataFrame({"request_id": [0, 1, 2], "scheduled_s": [0.0, 0.5, 1.0], "finish_s": [0.3, 0.8, 2.0],
                  "ttft_s": [0.1, 0.2, np.nan],
                  "tpot_s": [0.01, 0.02, np.nan], "measured": [False, True, True],
                  "error": [None, None, "timeout"], "token_times_s": [[0.1, 0.2], [0.3], []]}
                 ).to_parquet(jd / "requests.parquet")
    rows = []
    for i, (running, waiting, used, n_prefill, sum_prefill) in enumerate(
            [(0, 0, 0, 0, 0.0), (2, 3, 40, 10, 0.5), (1, 0, 20, 30, 1.5)]):
        mono = 99.5 + i  # samples 0.5 s before the load started, then 0.5 s and 1.5 s into it
        for metric, labels, value in [("requests_running", 'instance="prefill"', running),
                                      ("requests_running", 'instance="decode"', 1),
                                      ("requests_waiting", 'instance="prefill"', waiting),
                                      ("kv_blocks_used", 'instance="shared"', used),
                                      ("kv_blocks_total", 'instance="shared"', 100),
                                      ("partition_prefill_share", "", 60), ("partition_decode_share", "", 40),
                                      ("iterations", 'instance="prefill",phase="prefill"', n_prefill),
                                      ("iteration_time_sum_s", 'instance="prefill",phase="prefill"', sum_prefill)]:
            rows.append({"time_s": mono - 99.5, "metric": metric, "source": metric, "labels": labels,
                         "value": float(value), "monotonic_s": mono})
    pd.DataFrame(rows).to_parquet(jd / "server_metrics.parquet")
    with open(jd / "partition_log.jsonl", "w") as f:  # engine clock: the server was ready 1 s before the load
        for t, p, d in [(0.0, 50, 50), (2.0, 60, 40)]:
            f.write(json.dumps({"time_s": t, "prefill_share": p, "decode_share": d, "reason": "x"}) + "\n")
    return jd


def test_a_job_run_has_typed_requests_time_series_and_figures(tmp_path):
    sweep = tmp_path / "2026-01-01_00-00-00"
    jd = _job_dir(sweep)
    requests = pd.read_parquet(jd / "requests.parquet")
    log_job(OFFLINE, str(jd), str(sweep), jd.name, group="my_experiment", sweep_id=sweep.name, job_type="semipd",
            config={"engine": {"name": "semipd"}}, summary={"status": "ok", "aggregates": {"goodput": 1.5}},
            requests=requests)
    (run_dir,) = (sweep / "wandb").glob("offline-run-*")
    run = read_run(run_dir)
    assert run.run.run_group == "my_experiment" and run.run.job_type == "semipd"
    assert run.tags == ["mine", sweep.name] and run.config["sweep_id"] == sweep.name
    assert run.config["engine"] == {"name": "semipd"}

    table = run.table("requests")
    assert "token_times_s" not in table["columns"]
    col = {c: [r[i] for r in table["data"]] for i, c in enumerate(table["columns"])}
    assert col["ttft_s"] == [0.1, 0.2, None] and col["request_id"] == [0, 1, 2]
    assert col["measured"] == [False, True, True] and col["error"] == [None, None, "timeout"]

    # One history row per sample, on the load's clock; the totals, each instance, KV use as a fraction,
    # the partition, and the mean iteration time since the previous sample.
    server = run.series("server/t_s")
    assert [r["server/t_s"] for r in server] == [-0.5, 0.5, 1.5]
    assert [r["server/requests_running"] for r in server] == [1, 3, 2]
    assert [r["server/requests_running/prefill"] for r in server] == [0, 2, 1]
    assert [r["server/requests_waiting"] for r in server] == [0, 3, 0]
    assert [r["server/kv_usage"] for r in server] == [0, 0.4, 0.2]
    assert [r["server/partition_prefill_share"] for r in server] == [60, 60, 60]
    assert "server/iteration_time_s/prefill" not in server[0]  # nothing ran before the first sample
    assert [r["server/iteration_time_s/prefill"] for r in server[1:]] == [0.05, 0.05]
    assert not any(k.startswith("server/kv_usage/") for k in server[0])  # one pool: no per-pool copy
    partition = run.series("partition/t_s")
    assert [(r["partition/t_s"], r["partition/prefill_share"]) for r in partition] == [(-1.0, 50), (1.0, 60)]
    steps = {m.glob_name: m.step_metric for m in run.metrics if m.glob_name}
    assert steps == {"server/*": "server/t_s", "partition/*": "partition/t_s"}

    figures = {k for row in run.history for k in row if k.startswith("figures/")}
    assert figures == {"figures/latency_over_time", "figures/server_queues_and_kv_over_time",
                       "figures/partition_over_time"}
    assert all(row[k]["_type"] == "image-file" for row in run.history for k in row if k in figures)


def test_the_sweep_run_has_numeric_tables(tmp_path):
    summary = pd.DataFrame({"job": ["a", "b"], "engine": ["unified", "semipd"], "rate": [2.0, 4.0],
                            "status": ["ok", "failed"], "slo_attainment": [0.95, np.nan], "num_errors": [0, 3],
                            "valid": [True, False], "p99_ttft_s_ci_high": [1.0, math.inf], "cores": ["0,1", "2"],
                            "traceback": [None, "Traceback ..."]})
    points = pd.DataFrame({"engine": ["unified"], "rate": [2.0], "slo_attainment": [0.95], "n_seeds": [2]})
    log_sweep(OFFLINE, str(tmp_path), summary, [], group="my_experiment", points=points, goodput=pd.DataFrame())
    (run_dir,) = (tmp_path / "wandb").glob("offline-run-*")
    run = read_run(run_dir)
    assert run.run.run_group == "my_experiment" and run.run.job_type == "sweep-summary"
    assert run.config["sweep_id"] == tmp_path.name and tmp_path.name in run.tags
    table = run.table("summary")
    assert table["columns"] == [c for c in summary.columns if c != "traceback"]
    assert table["data"] == [["a", "unified", 2.0, "ok", 0.95, 0, True, 1.0, "0,1"],
                             ["b", "semipd", 4.0, "failed", None, 3, False, math.inf, "2"]]
    assert run.table("points")["data"] == [["unified", 2.0, 0.95, 2]]
    assert not run.series("goodput")  # an empty table is left out


def test_a_sweep_puts_every_run_in_one_wandb_directory(tmp_path):
    """A simulated sweep through run.py: `wandb sync <sweep>/wandb/offline-run-*` finds each job and the summary."""
    sweep = tmp_path / "sweep"
    cmd = [sys.executable, "run.py", "experiment=paper_llama3_8b_sharegpt", "engine=unified,semipd_dynamic",
           "workload.rate=8", "slo=llama3_8b_sharegpt_tight", "workload.num_requests=60", "wandb.mode=offline",
           "wandb.per_job_runs=true", f"results_dir={tmp_path}", f"hydra.sweep.dir={sweep}"]
    out = subprocess.run(cmd, cwd=ROOT, env={**os.environ, "WANDB_MODE": "disabled"}, capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-3000:]
    jobs = sorted(json.loads(p.read_text())["engine"] for p in sweep.glob("*/job.json"))
    assert jobs == ["semipd_dynamic", "unified"]
    runs = [p for p in sweep.rglob("offline-run-*") if p.is_dir()]
    assert sorted(p.relative_to(sweep).parts[0] for p in runs) == ["wandb"] * 3
    runs = [read_run(d) for d in (sweep / "wandb").glob("offline-run-*")]
    assert sorted(r.run.job_type for r in runs) == sorted([*jobs, "sweep-summary"])
    assert {r.run.run_group for r in runs} == {"paper_llama3_8b_sharegpt"}
    assert all(r.config["sweep_id"] == "sweep" and "sweep" in r.tags for r in runs)
    dynamic = next(r for r in runs if r.run.job_type == "semipd_dynamic")
    assert len(dynamic.series("partition/prefill_share")) >= 1  # the simulated partitioner's decisions
    table = next(r for r in runs if r.run.job_type == "sweep-summary").table("summary")
    col = dict(zip(table["columns"], zip(*table["data"])))
    assert all(isinstance(v, float) for v in col["slo_attainment"]) and all(type(v) is bool for v in col["valid"])


@pytest.mark.parametrize("mode,per_job,simulated,expected", [
    ("offline", None, True, False),  # a simulated point: its rows reach W&B in the sweep's summary run
    ("offline", None, False, True),  # a real engine's job: a run of its own
    ("offline", True, True, True), ("offline", False, False, False), ("disabled", True, False, False)])
def test_which_jobs_get_a_wandb_run_of_their_own(mode, per_job, simulated, expected):
    from experiments.sweep.tracking import logs_job

    assert logs_job(freeze(WandbConfig, {"mode": mode, "per_job_runs": per_job}), simulated) is expected
