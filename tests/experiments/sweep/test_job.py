"""One job: the goodput search, a failed job's record, skipping finished jobs, the headline metrics."""

from __future__ import annotations

import json

import pandas as pd
import pytest

from experiments.loadgen import run_loadgen
from experiments.sweep.config import ExperimentConfig, SLOConfig
from experiments.sweep.job import goodput_search, headline, read_job, run
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
    g = s["goodput_rate"]
    rates = [p["rate"] for p in s["probes"]]
    assert rates[:2] == [5.0, 40.0] and len(rates) > 3 and 5.0 <= g < 40.0
    # The bisection's invariant: the rate it reports meets the target, one within the tolerance above fails.
    by_rate = {p["rate"]: p["slo_attainment"] for p in s["probes"]}
    assert by_rate[g] >= 0.9
    assert any(g < r <= g + 4.0 and a < 0.9 for r, a in by_rate.items()), s["probes"]
    assert (tmp_path / "summary.json").is_file() and len(pd.read_parquet(tmp_path / "requests.parquet")) == 40 * len(rates)
    assert s["aggregates"]["slo_attainment"] >= 0.9


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

    (tmp_path / "job.json").write_text(json.dumps(done))
    with pytest.raises(ServerStartError):  # and so does a finished one when skipping is off
        run(compose_run(["experiment=single", "wandb.mode=disabled", "experiment.skip_finished=false"]),
            str(tmp_path))
    assert len(started) == 2


def test_read_job(tmp_path):
    assert read_job(tmp_path) is None
    (tmp_path / "job.json").write_text('{"status": "ok", "rate": 2.5}')
    assert read_job(tmp_path) == {"status": "ok", "rate": 2.5}


def test_headline_picks_each_metric_from_its_place():
    stats = {m: {q: i * 10 + j for j, q in enumerate(("mean", "p50", "p90", "p99"))}
             for i, m in enumerate(("ttft_s", "tpot_s", "itl_s", "e2e_s"))}
    summary = {"aggregates": {"slo_attainment": 0.8, "goodput": 3.2, "request_throughput": 4.0,
                              "output_token_throughput": 400.0, "num_requests": 10, "num_errors": 1, **stats},
               "self_check": {"valid": False}}
    h = headline(summary)
    assert (h["slo_attainment"], h["goodput_rps"], h["request_throughput"], h["output_token_throughput"]) == \
        (0.8, 3.2, 4.0, 400.0)
    assert (h["num_requests"], h["num_errors"], h["client_valid"]) == (10, 1, False)
    assert (h["mean_ttft_s"], h["p90_tpot_s"], h["p50_itl_s"], h["p99_e2e_s"]) == (0, 12, 21, 33)
    assert len(h) == 7 + 16
