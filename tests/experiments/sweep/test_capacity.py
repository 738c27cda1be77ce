"""Offered load relative to the machine: calibration cache, sweep pinning, sizing to a time budget, one rate axis."""

from __future__ import annotations

import json

import pytest
from omegaconf import open_dict

from experiments.sweep import capacity
from experiments.sweep.job import Job, check_overrides, resolve_machine
from hydra_plugins.semipd_launchers.sweeper import one_rate_axis
from tests.helpers.experiment_configs import compose_run

MACHINE = {"cpu": "test cpu", "cores": 2}
CAL = {"capacity_rps": 2.0, "startup_s": 10.0, "single_ttft_s": 0.1, "single_tpot_s": 0.02, "single_e2e_s": 0.7,
       "host_valid": True, "seconds": 30.0}


def _job(*overrides):
    return Job.from_cfg(compose_run(["experiment=single", "model=llama-100m", "workload=prompt_heavy", *overrides]))


@pytest.fixture
def fake_measure(monkeypatch):
    """capacity.measure replaced by a stand-in returning `result`; the calls are counted."""
    calls = []

    def install(result):
        def measure(*args, **kw):
            calls.append(args)
            return dict(result)

        monkeypatch.setattr(capacity, "measure", measure)
        return calls

    return install


def test_job_time_is_start_probes_arrivals_or_backlog_and_drain():
    # below the knee the arrivals set the pace; past it the backlog drains at the capacity
    below = capacity.job_seconds(1.0, 40, CAL, probe_requests=3)
    past = capacity.job_seconds(4.0, 40, CAL, probe_requests=3)
    probes = 2 * 3 * (0.1 + 7 * 0.02)  # 8-token answers: 7 decode steps each
    assert below == pytest.approx(10 + probes + 40 / 1.0 + 0.7 + capacity.JOB_FIXED_S)
    assert past == pytest.approx(10 + probes + 40 / 2.0 + 0.7 + capacity.JOB_FIXED_S)
    assert capacity.estimate([{"rate": 1.0, "num_requests": 40}] * 2, CAL, 3) == pytest.approx(2 * below)


def test_requests_per_point_fit_the_budget_but_never_below_the_floor():
    planned = [{"rate": r, "num_requests": 80, "relative": True} for r in (0.9, 1.8, 2.7)] * 4
    full = capacity.estimate(planned, CAL, 3)
    n = capacity.fit_requests(planned, CAL, 3, full * 0.7, floor=20)
    trial = [{**p, "num_requests": n} for p in planned]
    assert 20 < n < 80 and capacity.estimate(trial, CAL, 3) <= full * 0.7
    assert capacity.estimate([{**p, "num_requests": n + 1} for p in planned], CAL, 3) > full * 0.7
    assert capacity.fit_requests(planned, CAL, 3, 1.0, floor=40) == 40  # an impossible budget: the floor
    assert capacity.fit_requests(planned, CAL, 3, full * 2, floor=40) == 80  # room: every request


def test_calibration_is_cached_when_quiet_and_pinned_to_the_sweep(tmp_path, fake_measure):
    job = _job()
    calls = fake_measure(CAL)
    args = (job.model, job.engine, job.server, job.workload, job.loadgen, MACHINE)
    first = capacity.resolve(*args, sweep_dir=str(tmp_path / "sweep"))
    again = capacity.resolve(*args)
    assert len(calls) == 1 and not first["cached"] and again["cached"] and again["capacity_rps"] == 2.0
    pinned = json.loads((tmp_path / "sweep" / "capacity.json").read_text())
    assert list(pinned.values())[0]["capacity_rps"] == 2.0
    # the same single-request run is the SLO baseline of those lengths: no second server start for slo scales
    from experiments.sweep.slo import baseline_key, cache_path

    slo = json.loads(cache_path().read_text())[baseline_key(job.model, job.workload, MACHINE)]
    assert slo == {"ttft_s": 0.1, "tpot_s": 0.02}


def test_a_disturbed_calibration_serves_its_sweep_but_is_not_cached(tmp_path, fake_measure):
    job = _job()
    calls = fake_measure({**CAL, "host_valid": False, "host_foreign_cpu_frac": 0.4})
    args = (job.model, job.engine, job.server, job.workload, job.loadgen, MACHINE)
    capacity.resolve(*args, sweep_dir=str(tmp_path))
    assert capacity.resolve(*args, sweep_dir=str(tmp_path))["capacity_rps"] == 2.0  # the sweep keeps its own
    assert len(calls) == 1 and capacity.cached(job.model, job.engine, job.workload, job.loadgen, MACHINE) is None
    capacity.resolve(*args)  # outside that sweep: measured again
    assert len(calls) == 2


def test_every_engine_of_a_sweep_shares_one_capacity():
    keys = {capacity.capacity_key(j.model, j.engine, j.workload, j.loadgen, MACHINE)
            for j in (_job(f"engine={e}") for e in ("unified", "unified_chunked", "disagg", "semipd"))}
    assert len(keys) == 1
    assert len({capacity.capacity_key(j.model, j.engine, j.workload, j.loadgen, MACHINE)
                for j in (_job(), _job("model.dtype=float32"), _job("workload.length_scale=0.5"))}) == 3


def test_a_load_becomes_a_rate_and_the_sweep_sizing_applies(tmp_path, monkeypatch, fake_measure):
    monkeypatch.setenv("SEMIPD_AUTO_DTYPE", "float32")
    fake_measure(CAL)
    job = _job("workload.load=0.9", "experiment.time_budget_s=100")
    (tmp_path / "capacity.json").write_text(json.dumps({capacity.SIZING: {"num_requests": 42}}))
    resolved, decided = resolve_machine(job, MACHINE, str(tmp_path))
    assert resolved.workload.rate == pytest.approx(1.8) and resolved.workload.num_requests == 42
    assert resolved.model.dtype == "float32" and decided["dtype"].requested == "auto"
    assert decided["capacity"]["capacity_rps"] == 2.0 and decided["sized_num_requests"] == 42
    # without a budget the sweep's sizing does not apply
    unsized, _ = resolve_machine(_job("workload.load=0.9", "workload.num_requests=80"), MACHINE, str(tmp_path))
    assert unsized.workload.num_requests == 80


def test_load_is_refused_where_it_means_nothing():
    with pytest.raises(ValueError, match="workload.load is a fraction of this machine's measured capacity"):
        Job.from_cfg(compose_run(["experiment=single", "backend=sim", "model=llama3-8b", "workload.load=0.5"]))
    with pytest.raises(ValueError, match="workload.load must be > 0"):
        _job("workload.load=0")
    with pytest.raises(ValueError, match="workload.rate and workload.load=0.5 are both set"):
        check_overrides(_job("workload.load=0.5"), ["engine", "workload.rate"])


def _with_command_line(cfg, overrides):
    """`cfg` as a multirun sees it when `overrides` were typed (compose itself refuses sweep values)."""
    cfg = cfg.copy()
    with open_dict(cfg):
        cfg.hydra.overrides.task = list(overrides)
    return cfg


def test_the_demo_sweeps_loads_and_a_command_line_rate_replaces_them():
    demo = compose_run([], hydra=True)
    params = dict(demo.hydra.sweeper.params)
    assert params["workload.load"] == "0.45,0.9,1.35" and "workload.rate" not in params
    jobs = capacity.sweep_jobs(demo)
    assert len(jobs) == 12 and {j["workload.load"] for j in jobs} == {"0.45", "0.9", "1.35"}
    # `python run.py -m engine=unified,unified_chunked workload.rate=1,2,4` (README): rates, not rates x loads
    p, args = one_rate_axis(params, ["engine=unified,unified_chunked", "workload.rate=1,2,4"])
    assert "workload.load" not in p and args == ["engine=unified,unified_chunked", "workload.rate=1,2,4"]
    jobs = capacity.sweep_jobs(_with_command_line(demo, ["engine=unified,unified_chunked", "workload.rate=1,2,4"]))
    assert len(jobs) == 6 and all("workload.load" not in j for j in jobs)
    # a load on the command line replaces the preset's loads too
    assert one_rate_axis(params, ["workload.load=0.5"])[0]["workload.load"] == "0.45,0.9,1.35"  # same key: Hydra's
    assert len(capacity.sweep_jobs(_with_command_line(demo, ["workload.load=0.5,1"]))) == 8


def test_lengths_shrink_only_when_the_floor_is_over_budget():
    planned = [{"rate": capacity.rate_for(x, CAL), "load": x, "num_requests": 80, "relative": True}
               for x in (0.45, 0.9, 1.35)] * 4
    at_floor = capacity.estimate([{**p, "num_requests": 40} for p in planned], CAL, 3)
    assert capacity.fit_lengths(planned, CAL, 3, at_floor + 1, floor=40, min_scale=0.25) == 1.0
    s = capacity.fit_lengths(planned, CAL, 3, at_floor * 0.6, floor=40, min_scale=0.25)
    assert s in capacity.LENGTH_STEPS and s < 1.0
    # the chosen scale is predicted to fit, the next longer one is not
    longer = (1.0, *capacity.LENGTH_STEPS)[(1.0, *capacity.LENGTH_STEPS).index(s) - 1]
    for scale, fits in ((s, True), (longer, False)):
        c = capacity.at_lengths(CAL, scale)
        est = capacity.estimate([{**p, "num_requests": 40, "rate": capacity.rate_for(p["load"], c)}
                                 for p in planned], c, 3)
        assert (est <= at_floor * 0.6) is fits
    # an impossible budget: the shortest allowed
    assert capacity.fit_lengths(planned, CAL, 3, 1.0, floor=40, min_scale=0.5) == 0.5


def test_a_sweep_too_slow_for_its_budget_runs_shorter_requests_measured_at_those_lengths(
        tmp_path, monkeypatch, capsys):
    # A machine that serves 1 req/s at the workload's lengths (the demo would take ~20 min), twice that at half.
    seen, skipped = [], []

    def measure(model_cfg, engine_cfg, server_cfg, wcfg, lcfg, machine, worth=None):
        x = wcfg.length_scale
        seen.append(x)
        single = {"startup_s": 3.0, "single_ttft_s": 0.3 * x, "single_tpot_s": 0.02, "single_e2e_s": 2.0 * x}
        if worth is not None and not worth(single):  # not even the fastest capacity these latencies allow fits
            skipped.append(x)
            return {**CAL, **single, "capacity_rps": capacity.CAPACITY_X_E2E[0] / single["single_e2e_s"],
                    "predicted": True}
        return {**CAL, **single, "capacity_rps": 1.0 / x}

    monkeypatch.setattr(capacity, "measure", measure)
    from experiments.sweep import plan

    demo = compose_run([], hydra=True)
    total = plan.announce(demo, str(tmp_path))
    out = capsys.readouterr().out
    sizing = capacity.sweep_sizing(str(tmp_path))
    # the saturated run at full length is skipped (hopeless within the budget); the shorter lengths are measured
    assert skipped == [1.0] and seen == [1.0, sizing["length_scale"]] and sizing["length_scale"] < 1.0
    assert "workload.length_scale=" in out and "predicted" in out and total <= 540
    assert sizing["num_requests"] >= demo.experiment.min_requests
    # every job then runs at those lengths, at the capacity measured there, with the sweep's request count
    job = _job("workload.load=0.9", "experiment.time_budget_s=540")
    resolved, decided = resolve_machine(job, capacity_machine(), str(tmp_path))
    assert resolved.workload.length_scale == sizing["length_scale"] == decided["sized_length_scale"]
    assert resolved.workload.rate == pytest.approx(0.9 * 1.0 / sizing["length_scale"], rel=1e-3)
    assert resolved.workload.num_requests == sizing["num_requests"] and len(seen) == 2  # no third calibration
    # the next sweep decides from the cache alone; a job at full length never takes a predicted capacity
    plan.announce(demo, str(tmp_path / "again"))
    assert len(seen) == 2
    full = _job("workload.load=0.9", "experiment.time_budget_s=null")
    resolve_machine(full, capacity_machine(), str(tmp_path / "unsized"))
    assert seen[-1] == 1.0 and len(seen) == 3 and len(skipped) == 1  # measured, saturated run and all


def capacity_machine():
    from experiments.sweep.provenance import machine

    return machine()
