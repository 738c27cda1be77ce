"""`python run.py -m ...` end to end: a two-job sweep with real engine servers, its aggregate, figures, W&B
offline runs and provenance, `python -m experiments.figures` on the saved results, and a re-run that skips."""

from __future__ import annotations

import importlib.metadata
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd

from tests.helpers.experiment_configs import compose_run
from tests.helpers.wandb_offline import read_run

ROOT = Path(__file__).resolve().parents[2]
FIGURES = {"slo_attainment_vs_rate", "p90_latency_vs_rate", "mean_e2e_vs_rate", "goodput_per_engine",
           "slo_attainment_vs_slo_scale", "server_queues_and_kv_over_time"}


def _server_processes(marker: str) -> list[int]:
    out = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                cmd = f.read().replace(b"\0", b" ").decode(errors="replace")
            with open(f"/proc/{pid}/stat") as f:
                zombie = f.read().split()[2] == "Z"
        except OSError:
            continue
        if marker in cmd and not zombie:
            out.append(int(pid))
    return out


def test_two_job_multirun_end_to_end(tmp_path):
    results = tmp_path / "results"
    sweep = results / "sweep"
    # Two warm-up requests of eight; validity limits off (a shared test machine is not quiet, and this test is
    # about the pipeline, not the host).
    cmd = [sys.executable, "run.py", "-m", "engine=unified,unified_chunked", "model=tiny", "model.dtype=float32",
           "workload.rate=4", "workload.num_requests=8", "workload.length_scale=0.1", "loadgen.warmup_requests=2",
           "experiment.max_host_interference=1.0", "experiment.max_step_slowdown=1000", f"results_dir={results}",
           "wandb.mode=offline", "loadgen.progress=false", f"hydra.sweep.dir={sweep}"]
    env = {**os.environ, "WANDB_MODE": "offline"}
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert not _server_processes(str(results)), "an engine server outlived its job"

    # One row per job, named by its overrides (the excluded keys left out), with what the inputs imply.
    summary = pd.read_csv(sweep / "summary.csv").sort_values("engine", ignore_index=True)
    engines = ["unified", "unified_chunked"]
    assert list(summary["engine"]) == engines
    assert list(summary["job"]) == [f"engine={e},experiment.max_host_interference=1.0,experiment.max_step_slowdown=1000,"
                                    f"loadgen.warmup_requests=2,model.dtype=float32,model=tiny,workload.length_scale=0.1,"
                                    f"workload.num_requests=8,workload.rate=4" for e in engines]
    assert (summary["status"] == "ok").all() and (summary["num_errors"] == 0).all()
    assert (summary["rate"] == 4.0).all() and (summary["workload.rate"] == 4).all()
    assert (summary["num_requests"] == 6).all()  # measured: the warm-up requests are not counted
    assert summary["valid"].all() and summary["host_checked"].all()
    assert (summary["slo_attainment_ci_low"] <= summary["slo_attainment"]).all()
    assert (summary["step_probe_before_tpot_s"] > 0).all() and (summary["step_probe_after_tpot_s"] > 0).all()
    # The demo experiment's SLOs: multiples of the unified engine's single-request latency on this machine.
    slo = compose_run(["engine=unified", "workload.rate=4"]).slo
    assert (summary["slo_baseline_ttft_s"] > 0).all() and (summary["slo_baseline_tpot_s"] > 0).all()
    assert np.allclose(summary["slo_ttft_s"], slo.ttft_scale * summary["slo_baseline_ttft_s"])
    assert np.allclose(summary["slo_tpot_s"], slo.tpot_scale * summary["slo_baseline_tpot_s"])
    assert (summary["dtype"] == "float32").all()  # the model's dtype, resolved, is in every row

    # Every request of every job, tagged with its job; the headline attainment is what its requests imply.
    req = pd.read_parquet(sweep / "requests.parquet")
    assert req.groupby("engine").size().to_dict() == {e: 8 for e in engines}
    assert (req["rate"] == 4.0).all() and (req["workload.rate"] == 4).all() and req["error"].isna().all()
    for _, row in summary.iterrows():
        mine = req[req["job"] == row["job"]]
        assert sorted(mine["request_id"]) == list(range(8))
        assert mine.equals(req[req["engine"] == row["engine"]])
        assert mine["measured"].sum() == 6 and not mine.sort_values("scheduled_s").head(2)["measured"].any()
        mine = mine[mine["measured"]]
        met = (mine["ttft_s"] <= row["slo_ttft_s"]) & (mine["tpot_s"].isna() | (mine["tpot_s"] <= row["slo_tpot_s"]))
        assert row["slo_attainment"] == met.mean()
        job_summary = json.loads((sweep / row["job"] / "summary.json").read_text())
        assert job_summary["aggregates"]["num_requests"] == 6 and job_summary["validity"]["valid"]
        assert job_summary["aggregates"]["slo_attainment"] == row["slo_attainment"]

    # Provenance: this checkout's commit, this machine, the installed packages, the job's own config.
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    for _, row in summary.iterrows():
        prov = json.loads((sweep / row["job"] / "provenance.json").read_text())
        assert prov["git_commit"] == head
        assert prov["machine"]["cores"] == os.cpu_count()
        assert prov["packages"]["torch"] == importlib.metadata.version("torch")
        assert prov["config"]["engine"]["name"] == row["engine"] and prov["config"]["workload"]["rate"] == 4.0

    # W&B: one offline run per job and one summary run, all under <sweep>/wandb/ (one `wandb sync` glob), grouped
    # by the experiment; each job's run has the server's queues over time.
    runs = [r for r in sweep.rglob("offline-run-*") if r.is_dir()]
    assert {r.parent for r in runs} == {sweep / "wandb"}, runs
    runs = [read_run(r) for r in runs]
    assert sorted(r.run.display_name for r in runs) == sorted([*summary["job"], "sweep-summary"])
    assert {r.run.run_group for r in runs} == {"demo"} and all(r.config["sweep_id"] == "sweep" for r in runs)
    assert all(r.series("server/requests_running") for r in runs if r.run.job_type != "sweep-summary")

    # The sweep's table on the terminal, and its figures.
    assert f"sweep {sweep}: 2 jobs (2 ok, 0 invalid)" in proc.stdout
    table = proc.stdout.split(f"sweep {sweep}: 2 jobs (2 ok, 0 invalid)\n", 1)[1].splitlines()
    assert table[0].split()[0] == "engine" and "slo_attainment" in table[0].split()
    assert [line.split()[0] for line in table[1:3]] == engines
    assert {"points.csv", "goodput.csv", "sweep.json"} <= {p.name for p in sweep.iterdir()}
    first = {p.name for p in (sweep / "figures").iterdir()}
    assert first == {f"{f}.{ext}" for f in FIGURES for ext in ("png", "pdf")}

    # Figures regenerate from the saved results alone.
    shutil.rmtree(sweep / "figures")
    out = subprocess.run([sys.executable, "-m", "experiments.figures", str(sweep)], cwd=ROOT, capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert {p.name for p in (sweep / "figures").iterdir()} == first
    assert sorted(Path(p).name for p in out.stdout.split()) == sorted(first)

    # Re-running the same sweep skips finished jobs: their records and measurements stay as they were.
    before = {j: (sweep / j / "job.json").read_text() for j in summary["job"]}
    mtimes = {j: (sweep / j / "requests.parquet").stat().st_mtime_ns for j in summary["job"]}
    again = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300, env=env)
    assert again.returncode == 0, again.stderr[-3000:]
    assert (again.stdout + again.stderr).count("already finished: skipping") == 2
    assert {j: (sweep / j / "job.json").read_text() for j in summary["job"]} == before
    assert {j: (sweep / j / "requests.parquet").stat().st_mtime_ns for j in summary["job"]} == mtimes


def test_ctrl_c_stops_the_sweep_with_a_message_not_a_traceback(tmp_path):
    import signal
    import time

    sweep = tmp_path / "sweep"
    cmd = [sys.executable, "run.py", "-m", "engine=unified", "model=tiny", "workload.rate=1",
           "workload.num_requests=1000", "experiment.max_host_interference=1.0", "experiment.max_step_slowdown=1000",
           f"results_dir={tmp_path}", "wandb.mode=disabled", "loadgen.progress=false", f"hydra.sweep.dir={sweep}"]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    deadline = time.monotonic() + 180
    # run.py's own command line names the sweep: wait for the job itself (its record, then its server).
    while time.monotonic() < deadline and not (list(sweep.glob("*/job.json"))
                                               and set(_server_processes(str(sweep))) - {proc.pid}):
        time.sleep(0.5)
    time.sleep(3)  # the server is starting or the load is running: either way the job must end `interrupted`
    os.killpg(proc.pid, signal.SIGINT)  # as a terminal's Ctrl-C reaches the whole foreground group
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, out[-2000:] + err[-3000:]
    assert "Traceback" not in err, err[-3000:]
    assert "run.py: interrupted" in err and "hydra.sweep.dir" in err
    job = json.loads(next(sweep.glob("*/job.json")).read_text())
    assert job["status"] == "interrupted"
    assert not _server_processes(str(sweep))
