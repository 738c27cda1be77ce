"""One job: the goodput search, a failed job's record, skipping finished jobs, probes around the load."""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from pathlib import Path

import pandas as pd
import pytest

from experiments.loadgen import run_loadgen
from experiments.loadgen.result import Aggregates, Latency, RunResult, SLOs, WorkloadRun
from experiments.sweep.config import ExperimentConfig, SLOConfig
from experiments.sweep.job import JobInterrupted, goodput_search, read_job, run
from experiments.sweep.launch import ServerStartError
from semipd_engine.config import freeze
from tests.helpers.experiment_configs import compose_run, loadgen_cfg, workload_cfg
from tests.helpers.mock_openai import MockOpenAIServer


def test_goodput_bisection_finds_the_rate_a_single_server_queue_sustains(tmp_path):
    """Service time 50 ms one at a time (capacity 20 req/s): attainment falls between the bounds."""
    exp = freeze(ExperimentConfig, {"mode": "goodput", "goodput_low": 5.0, "goodput_high": 40.0,
                                    "goodput_tolerance": 4.0, "goodput_seeds": [0]})
    slo = freeze(SLOConfig, {"ttft_s": 0.3, "tpot_s": 1.0})
    w = workload_cfg(name="fixed", prompt_len=4, output_len=1, num_requests=40, arrival="poisson")
    with MockOpenAIServer(ttft_s=0.05, itl_s=0.0, serial=True) as srv:
        s = goodput_search(lambda wcfg, out: run_loadgen(loadgen_cfg(srv.url), wcfg, slo, out), w, slo, exp, tmp_path)
    g = s.goodput.goodput_rate
    rates = [p["rate"] for p in s.goodput.probes]
    assert rates[:2] == [5.0, 40.0] and len(rates) > 3 and 5.0 <= g < 40.0
    # The bisection's invariant: the rate it reports meets the target, one within the tolerance above fails.
    by_rate = {p["rate"]: p["slo_attainment"] for p in s.goodput.probes}
    assert by_rate[g] >= 0.9
    assert any(g < r <= g + 4.0 and a < 0.9 for r, a in by_rate.items()), s.goodput.probes
    assert (tmp_path / "summary.json").is_file() and len(pd.read_parquet(tmp_path / "requests.parquet")) == 40 * len(rates)
    assert s.aggregates.slo_attainment >= 0.9
    # Like a single run's result: the workload (and its lengths) and the SLOs the reported probe ran under; the
    # file is the same type, the search's keys at its top.
    assert s.workload.name == "fixed" and s.workload.lengths and s.slo.ttft_s == 0.3
    assert json.dumps(RunResult.load(tmp_path).to_dict(), default=str) == json.dumps(s.to_dict(), default=str)
    assert json.loads((tmp_path / "summary.json").read_text())["goodput_rate"] == g


def test_failed_job_is_recorded(tmp_path):
    missing = tmp_path / "missing"
    cfg = compose_run(["experiment=single", "model=hf", f"model.path={missing}", "wandb.mode=disabled",
                       "workload.rate=3"])
    jd = tmp_path / "job"
    with pytest.raises(ServerStartError):
        run(cfg, str(jd), overrides={"model": "hf", "workload.rate": "3"})
    job = read_job(jd)
    assert job["status"] == "failed"
    assert job["error"].startswith("ServerStartError: engine server exited with code")
    assert "ServerStartError" in job["traceback"]
    assert (job["engine"], job["rate"], job["model"], job["mode"]) == ("unified", 3.0, str(missing), "single")
    assert job["overrides"] == {"model": "hf", "workload.rate": "3"}
    assert job["started"] <= job["finished"]
    assert "slo_attainment" not in job and not (jd / "requests.parquet").exists()
    prov = json.loads((jd / "provenance.json").read_text())
    assert prov["config"]["model"]["path"] == str(missing) and prov["config"]["workload"]["rate"] == 3.0


def test_only_a_finished_job_is_skipped(tmp_path, monkeypatch):
    from experiments.sweep import job as job_module

    started = []

    class NoServer:
        def __init__(self, *args, **kwargs):
            started.append(args)
            raise ServerStartError("no server in this test")

    monkeypatch.setattr(job_module, "EngineServer", NoServer)
    cfg = compose_run(["experiment=single", "wandb.mode=disabled"])
    done = {"status": "ok", "engine": "unified", "slo_attainment": 0.75}
    (tmp_path / "job.json").write_text(json.dumps(done))
    assert run(cfg, str(tmp_path)) == done
    assert not started and sorted(p.name for p in tmp_path.iterdir()) == ["job.json"]

    (tmp_path / "job.json").write_text(json.dumps({"status": "failed", "engine": "unified"}))
    with pytest.raises(ServerStartError):  # a failed job runs again
        run(cfg, str(tmp_path))
    assert len(started) == 1 and read_job(tmp_path)["error"] == "ServerStartError: no server in this test"

    (tmp_path / "job.json").write_text(json.dumps({**done, "valid": False}))
    with pytest.raises(ServerStartError):  # an invalid measurement runs again
        run(cfg, str(tmp_path))
    assert len(started) == 2

    (tmp_path / "job.json").write_text(json.dumps(done))
    with pytest.raises(ServerStartError):  # and so does a finished one when skipping is off
        run(compose_run(["experiment=single", "wandb.mode=disabled", "experiment.skip_finished=false"]),
            str(tmp_path))
    assert len(started) == 3


def test_read_job(tmp_path):
    assert read_job(tmp_path) is None
    (tmp_path / "job.json").write_text('{"status": "ok", "rate": 2.5}')
    assert read_job(tmp_path) == {"status": "ok", "rate": 2.5}


class _MockEngineServer:
    """Stands in for EngineServer in a job: the in-process mock OpenAI server (no engine process)."""

    last = None

    def __init__(self, *args, **kwargs):
        self.srv = MockOpenAIServer(ttft_s=0.01, itl_s=0.002)
        _MockEngineServer.last = self

    def __enter__(self):
        self.srv.__enter__()
        self.url = self.srv.url
        return self

    def __exit__(self, *exc):
        self.stop()

    def stop(self):
        if self.srv._thread.is_alive():
            self.srv.__exit__(None, None, None)


_MOCK_JOB = ["experiment=single", "wandb.mode=disabled", "workload=fixed", "workload.prompt_len=4",
             "workload.output_len=4", "workload.num_requests=40", "workload.rate=20", "loadgen.tokenizer=none",
             "loadgen.progress=false", "experiment.step_probe_requests=0"]


def _sigterm_after(n_requests: int) -> threading.Thread:
    """SIGTERM to this process once the mock server has received `n_requests` of the load."""
    def watch():
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            srv = _MockEngineServer.last
            if srv is not None and len(srv.srv.received) >= n_requests:
                os.kill(os.getpid(), signal.SIGTERM)
                return
            time.sleep(0.01)

    t = threading.Thread(target=watch, daemon=True)
    t.start()
    return t


def test_a_job_interrupted_mid_load_is_recorded_as_interrupted_and_runs_again(tmp_path, monkeypatch):
    from experiments.sweep import job as job_module

    monkeypatch.setattr(job_module, "EngineServer", _MockEngineServer)
    cfg = compose_run(_MOCK_JOB)
    _MockEngineServer.last = None
    watcher = _sigterm_after(8)  # 40 requests at 20/s: ~2 s of load, interrupted after ~0.4 s of it
    with pytest.raises(JobInterrupted):
        run(cfg, str(tmp_path))
    watcher.join()
    job = read_job(tmp_path)
    assert job["status"] == "interrupted" and job["valid"] is False and "SIGTERM" in job["error"]
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["interrupted"] and summary["signal"] == "SIGTERM" and not summary["validity"]["valid"]
    assert summary["completeness"]["not_sent"] > 0 and not summary["completeness"]["complete"]
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # the job gave the handlers back

    # The next run of the sweep runs it again (only `ok` is skipped), and this time it completes.
    again = run(cfg, str(tmp_path))
    assert again["status"] == "ok" and read_job(tmp_path)["status"] == "ok"
    assert again["num_requests"] == 40 - 5  # the default warm-up requests are not counted
    df = pd.read_parquet(tmp_path / "requests.parquet")
    assert len(df) == 40 and df["error"].isna().all() and df["measured"].sum() == 35
    assert not df.sort_values("scheduled_s").head(5)["measured"].any()
    # Validity travels with the row: the client's check, the host's, the interval columns.
    assert {"valid", "invalid_reasons", "host_valid", "host_foreign_cpu_frac", "client_valid",
            "slo_attainment_ci_low", "slo_attainment_ci_high", "p90_ttft_s_ci_low", "p90_ttft_s_ci_high",
            "request_throughput_ci_low"} <= set(again)
    assert again["slo_attainment_ci_low"] <= again["slo_attainment"] <= again["slo_attainment_ci_high"]


def test_goodput_search_flags_the_top_of_the_range_and_probe_validity(tmp_path):
    exp = freeze(ExperimentConfig, {"mode": "goodput", "goodput_low": 1.0, "goodput_high": 8.0,
                                    "goodput_tolerance": 1.0, "goodput_seeds": [0]})
    slo = freeze(SLOConfig, {"ttft_s": 1.0, "tpot_s": 1.0})

    def measure(attain, invalid_at=None, offered_up_to=None):
        def f(wcfg, out):
            Path(out).mkdir(parents=True, exist_ok=True)
            pd.DataFrame({"request_id": [0]}).to_parquet(Path(out) / "requests.parquet")
            stats = Latency(0.1, 0.1, 0.1, 0.1)
            bad = wcfg.rate == invalid_at
            reached = {} if offered_up_to is None else {"offered_rate_reached": wcfg.rate <= offered_up_to}
            a = Aggregates(num_requests=10, num_ok=10, num_errors=0, duration_s=10.0, request_throughput=1.0,
                           output_token_throughput=1.0, total_token_throughput=2.0,
                           slo_attainment=attain(wcfg.rate), goodput=1.0, ttft_s=stats, tpot_s=stats, e2e_s=stats,
                           steady_state=reached)
            return RunResult(a, SLOs(1.0, 1.0), WorkloadRun("fixed", 10, "poisson", wcfg.rate),
                             self_check={"valid": not bad, "reasons": ["late"] if bad else []})
        return f

    top = goodput_search(measure(lambda r: 1.0), workload_cfg(), slo, exp, tmp_path / "a")
    assert top.goodput.goodput_rate == 8.0 and top.goodput.goodput_at_range_top
    assert not top.goodput.goodput_at_range_bottom
    bottom = goodput_search(measure(lambda r: 0.0), workload_cfg(), slo, exp, tmp_path / "b")
    assert bottom.goodput.goodput_rate == 0.0 and bottom.goodput.goodput_at_range_bottom
    mid = goodput_search(measure(lambda r: 1.0 if r <= 3 else 0.5, invalid_at=8.0), workload_cfg(), slo, exp,
                         tmp_path / "c")
    assert 2.0 <= mid.goodput.goodput_rate <= 3.0 and mid.goodput.goodput_monotone  # within the tolerance below 3
    assert not mid.goodput.goodput_at_range_top and not mid.checked().valid
    assert mid.validity.reasons == ("probe 8 req/s seed 0: client: late",)
    # conversations that never offered the rate asked for: attainment at it certifies nothing
    unreached = goodput_search(measure(lambda r: 1.0, offered_up_to=5.0), workload_cfg(), slo, exp, tmp_path / "d")
    assert 4.0 <= unreached.goodput.goodput_rate <= 5.0 and not unreached.goodput.goodput_at_range_top


def test_step_probe_verdict():
    from experiments.sweep.probe import verdict

    fast, slow = {"tpot_s": 0.002, "ttft_s": 0.01}, {"tpot_s": 0.004, "ttft_s": 0.01}
    first = verdict(fast, fast, None, 1.5, host_valid=True)
    assert first["reasons"] == [] and first["save"]  # a clean first run calibrates
    assert not verdict(fast, fast, None, 1.5, host_valid=False)["save"]  # a disturbed one does not
    during = verdict(fast, slow, fast, 1.5, host_valid=True)
    assert during["after_over_before"] == 2.0 and "after the load" in during["reasons"][0] and not during["save"]
    machine = verdict(slow, slow, fast, 1.5, host_valid=True)
    assert machine["before_over_calibrated"] == 2.0 and "calibrated" in machine["reasons"][0]


def test_a_real_job_probes_the_engine_before_and_after_its_load(tmp_path, monkeypatch):
    from experiments.sweep import job as job_module
    from experiments.sweep.probe import calibration_path

    monkeypatch.setattr(job_module, "EngineServer", _MockEngineServer)
    overrides = [o for o in _MOCK_JOB if not o.startswith(("experiment.step_probe", "workload.num_requests",
                                                           "workload.rate"))]
    cfg = compose_run([*overrides, "workload.num_requests=8", "workload.rate=50", "experiment.step_probe_requests=2",
                       "experiment.max_host_interference=1.0"])
    rec = run(cfg, str(tmp_path))
    sp = json.loads((tmp_path / "summary.json").read_text())["step_probe"]
    assert sp["before"]["tpot_s"] > 0 and sp["after"]["tpot_s"] > 0 and sp["reasons"] == []
    assert rec["step_probe_before_tpot_s"] == sp["before"]["tpot_s"]
    assert len(_MockEngineServer.last.srv.received) == 8 + 2 * 2  # the probes' requests are not in the rows
    assert len(pd.read_parquet(tmp_path / "requests.parquet")) == 8
    saved = json.loads(calibration_path().read_text())  # a clean first run calibrated this engine
    assert list(saved.values()) == [sp["before"]]


def test_a_signal_while_the_server_starts_still_stops_it(tmp_path, monkeypatch):
    from experiments.sweep import job as job_module

    stopped = []

    class SlowStart:
        def __init__(self, *args, **kwargs):
            pass

        def __enter__(self):
            raise JobInterrupted("SIGTERM")  # as the handler would, mid-way through waiting for /health

        def __exit__(self, *exc):
            stopped.append("exit")

        def stop(self):
            stopped.append("stop")

    monkeypatch.setattr(job_module, "EngineServer", SlowStart)
    with pytest.raises(JobInterrupted):
        run(compose_run(_MOCK_JOB), str(tmp_path))
    assert stopped == ["stop"] and read_job(tmp_path)["status"] == "interrupted"


@pytest.mark.parametrize("backend", [[], ["backend=sim", "model=llama3-8b"]])
def test_an_unknown_tpot_definition_fails_the_job_before_it_starts(backend):
    from experiments.sweep.job import Job

    with pytest.raises(ValueError, match=r"slo.tpot_definition='p95_itl': expected one of mean, p90_itl, p99_itl, "
                                         r"max_itl, first_to_second"):
        Job.from_cfg(compose_run(["experiment=single", *backend, "slo.tpot_definition=p95_itl"]))


def test_a_gap_definition_needs_a_stream_only_from_a_real_server():
    from experiments.sweep.job import Job

    with pytest.raises(ValueError, match="loadgen.stream=true"):
        Job.from_cfg(compose_run(["experiment=single", "slo.tpot_definition=max_itl", "loadgen.stream=false"]))
    sim = Job.from_cfg(compose_run(["experiment=single", "backend=sim", "model=llama3-8b",
                                    "slo.tpot_definition=max_itl", "loadgen.stream=false"]))
    assert sim.slo.tpot_definition == "max_itl"  # the simulator times every token either way


def test_a_simulated_job_is_judged_under_its_tpot_definition_and_records_the_others(tmp_path):
    from experiments.analysis.points import points
    from experiments.sweep.aggregate import aggregate_sweep

    record = run(compose_run(["experiment=single", "backend=sim", "model=llama3-8b", "wandb.mode=disabled",
                              "workload.num_requests=60", "workload.rate=4", "slo.tpot_definition=max_itl"]),
                 str(tmp_path / "job"))
    assert record["slo"]["tpot_definition"] == record["tpot_definition"] == "max_itl"
    assert record["slo_attainment"] == record["slo_attainment_tpot_max_itl"]
    assert record["slo_attainment_tpot_max_itl"] <= record["slo_attainment_tpot_mean"]
    assert isinstance(record["stalled_requests"], int) and isinstance(record["steady_state"], bool)
    summary, requests = aggregate_sweep(tmp_path)
    assert summary.loc[0, "slo_tpot_definition"] == "max_itl" and (requests["slo_tpot_definition"] == "max_itl").all()
    pts = points(summary, requests)  # pooled from the requests under the same definition
    assert pts.loc[0, "slo_attainment"] == pytest.approx(record["slo_attainment"])
    assert pts.loc[0, "steady_state"] == record["steady_state"]
