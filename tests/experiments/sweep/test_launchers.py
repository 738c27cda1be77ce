"""The sweep's launchers: `local` runs as many jobs at once as the cores hold; `ray_cluster` asks Ray for what each
job's engine occupies and refuses, naming both sides, a job no node can hold; two-job sweeps run on a local Ray
cluster, on submitit's local executor and on the local launcher."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
from hydra import compose, initialize_config_dir
from hydra.errors import ConfigCompositionException

from experiments.sweep import conf_store, cores
from experiments.sweep.aggregate import check_launch
from experiments.sweep.job import Job
from experiments.sweep.launchers import (
    LOCAL_LAUNCHER,
    RAY_LAUNCHER,
    LaunchRefused,
    Node,
    job_cores,
    job_gpus,
    local_n_jobs,
    plan_ray,
    ray_request,
)
from tests.helpers.experiment_configs import compose_run

ROOT = Path(__file__).resolve().parents[3]
# Two simulated jobs (a virtual clock: no engine process, well under a second each).
SIM_SWEEP = ["-m", "backend=sim", "model=llama3-8b", "engine=unified", "workload.rate=1,2", "workload.num_requests=20",
             "loadgen.progress=false"]


def _with_hydra(overrides):
    with initialize_config_dir(config_dir=conf_store.CONF_DIR, version_base=None):
        return compose("config", overrides=list(overrides), return_hydra_config=True)


def _job(*overrides) -> Job:
    return Job.from_cfg(compose_run(["experiment=single", *overrides]))


def _sweep(tmp_path, *overrides, timeout=120):
    cmd = [sys.executable, "run.py", *SIM_SWEEP, f"results_dir={tmp_path}", f"hydra.sweep.dir={tmp_path / 'sweep'}",
           *overrides]
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, "WANDB_MODE": "disabled"})


def _two_ok_jobs(tmp_path, out):
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    summary = pd.read_csv(tmp_path / "sweep" / "summary.csv")
    assert sorted(summary["rate"]) == [1.0, 2.0] and set(summary["status"]) == {"ok"}
    jobs = [json.loads(p.read_text()) for p in (tmp_path / "sweep").glob("*/job.json")]
    assert len(jobs) == 2 and all(j["backend"] == "sim" for j in jobs)


def test_presets_compose_and_name_their_keys():
    local = _with_hydra(["hydra/launcher=local"]).hydra.launcher
    assert local._target_ == LOCAL_LAUNCHER and local.n_jobs == -1
    assert _with_hydra(["hydra/launcher=local", "hydra.launcher.n_jobs=3"]).hydra.launcher.n_jobs == 3
    ray = _with_hydra(["hydra/launcher=ray_cluster"]).hydra.launcher
    assert ray._target_ == RAY_LAUNCHER and dict(ray.ray.init) == {"address": "auto"} and dict(ray.ray.remote) == {}
    assert ray.start_timeout_s == 120
    ray = _with_hydra(["hydra/launcher=ray_cluster", "hydra.launcher.ray.init.address=10.0.0.5:6379",
                       "+hydra.launcher.ray.remote.num_gpus=2", "hydra.launcher.start_timeout_s=5"]).hydra.launcher
    assert ray.ray.init.address == "10.0.0.5:6379" and ray.ray.remote.num_gpus == 2 and ray.start_timeout_s == 5
    with pytest.raises(ConfigCompositionException):
        _with_hydra(["hydra/launcher=ray_cluster", "hydra.launcher.start_timeout=5"])  # a typo fails at once


def test_the_ray_launcher_freezes_its_settings():
    from hydra.utils import instantiate

    launcher = instantiate(_with_hydra(["hydra/launcher=ray_cluster"]).hydra.launcher)
    assert launcher.settings.ray.init == {"address": "auto"} and launcher.settings.start_timeout_s == 120
    with pytest.raises(AttributeError):
        launcher.settings.start_timeout_s = 1


def test_local_runs_as_many_jobs_as_the_cores_hold():
    assert local_n_jobs(-1, [1, 1, 1], available=2) == 2  # simulated jobs: one core each
    assert local_n_jobs(-1, [1] * 20, available=8) == 8
    assert local_n_jobs(-2, [1] * 20, available=8) == 7  # joblib's "all but one"
    assert local_n_jobs(-1, [1, 1], available=8) == 2  # never more than the sweep has
    assert local_n_jobs(-1, [8, 8], available=8) == 1  # real engines take the machine
    assert local_n_jobs(-1, [2, 2, 2, 2, 2], available=8) == 4  # experiment.cores_per_job=2
    assert local_n_jobs(-1, [1, 8], available=8) == 1  # the widest job sets the slots
    assert local_n_jobs(2, [1, 1], available=2) == 2
    with pytest.raises(LaunchRefused, match=r"n_jobs=3 .* at most 2 fit .* hydra.launcher.n_jobs=2"):
        local_n_jobs(3, [1, 1, 1], available=2)
    with pytest.raises(LaunchRefused, match="n_jobs=0"):
        local_n_jobs(0, [1], available=2)
    n = len(cores.machine_cores())
    assert job_cores(_job("backend=sim", "model=llama3-8b")) == 1
    assert job_cores(_job()) == n and job_cores(_job("experiment.cores_per_job=1")) == 1
    # The sweep-start check leaves the default to the launcher, which sizes itself to fit.
    assert cores.launcher_jobs(_with_hydra(["hydra/launcher=local"]).hydra.launcher) is None
    check_launch(_with_hydra(["hydra/launcher=local"]))


NODES = [Node("cpu-node", {"CPU": 16.0, "memory": 64 * 2**30}), Node("gpu-node", {"CPU": 32.0, "GPU": 4.0})]


def test_ray_requests_are_sized_from_each_jobs_engine():
    def ask(*overrides, remote=None):
        r = ray_request(_job(*overrides), remote or {}, NODES)
        return r.num_cpus, r.num_gpus

    assert ask("backend=sim", "model=llama3-8b") == (1, 0)  # a virtual clock: one core, no GPU
    assert ask("backend=sim", "model=llama3-8b", "engine=disagg") == (1, 0)  # models two GPUs, uses none
    assert ask() == (32, 0)  # this project's engine on CPU takes a whole (the largest) node
    assert ask("model.device=cuda") == (32, 1)
    assert ask("model.device=cuda", "experiment.cores_per_job=4") == (4, 1)
    assert ask("engine=vllm", "model=hf", "model.path=/models/m", "model.tensor_parallel_size=2") == (32, 2)
    assert ask("model.device=cuda", remote={"num_cpus": 3, "num_gpus": 0}) == (3, 0)
    assert job_gpus(_job("backend=sim", "model=llama3-8b", "engine=disagg")) == 0
    on_gpu = ray_request(_job("model.device=cuda"), {}, NODES)
    assert [on_gpu.fits(n) for n in NODES] == [False, True]
    custom = ray_request(_job("backend=sim", "model=llama3-8b"), {"resources": {"a100": 1}}, NODES)
    assert not any(custom.fits(n) for n in NODES) and custom.needs()["a100"] == 1


class _Clock:
    def __init__(self):
        self.t, self.sleeps = 0.0, []

    def __call__(self):
        return self.t

    def sleep(self, s):
        self.sleeps.append(s)
        self.t += s


def test_a_job_no_node_can_hold_fails_naming_both_sides():
    clock = _Clock()
    jobs = [_job("backend=sim", "model=llama3-8b"), _job("model.device=cuda", "experiment.cores_per_job=2")]
    head = [Node("head", {"CPU": 2.0})]
    with pytest.raises(LaunchRefused) as e:
        plan_ray(jobs, ["#0 (sim)", "#1 (cuda)"], {}, 10.0, nodes=lambda: head, sleep=clock.sleep, clock=clock)
    msg = str(e.value)
    assert "job #1 (cuda) asks Ray for 2 CPU, 1 GPU" in msg and "1 node(s): head: 2 CPU, 0 GPU" in msg
    assert "hydra.launcher.start_timeout_s=10" in msg and "experiment.cores_per_job" in msg
    assert 10 <= clock.t < 16 and clock.sleeps  # it waited for a node to join, then gave up
    # A node that joins while the sweep waits (an autoscaler's) is used.
    clock = _Clock()
    grown = iter([head, head, [*head, NODES[1]]])
    requests = plan_ray(jobs, ["#0", "#1"], {}, 60.0, nodes=lambda: next(grown), sleep=clock.sleep, clock=clock)
    assert [(r.num_cpus, r.num_gpus) for r in requests] == [(1, 0), (2, 1)] and len(clock.sleeps) == 2
    # No wait at all with start_timeout_s=0.
    clock = _Clock()
    with pytest.raises(LaunchRefused):
        plan_ray(jobs, ["#0", "#1"], {}, 0.0, nodes=lambda: head, sleep=clock.sleep, clock=clock)
    assert not clock.sleeps


def test_a_wrong_job_fails_the_sweep_before_any_job_runs(tmp_path):
    out = _sweep(tmp_path, "hydra/launcher=local", "model.tensor_parallel_size=3")
    assert out.returncode == 2 and re.search(r"error: job #0 \(.*\): .*model\.tensor_parallel_size", out.stderr)
    assert not list((tmp_path / "sweep").glob("*/job.json"))


def test_two_job_sweep_on_the_local_launcher_runs_jobs_side_by_side(tmp_path):
    out = _sweep(tmp_path)  # the default launcher: `local`
    _two_ok_jobs(tmp_path, out)
    n = min(2, len(cores.machine_cores()))
    assert f"Launching 2 jobs locally, {n} at a time" in out.stdout + out.stderr


@pytest.fixture
def ray_cluster():
    """A Ray cluster on this machine that the sweep joins by address, as it would a real one."""
    ray = pytest.importorskip("ray")
    pytest.importorskip("hydra_plugins.hydra_ray_launcher")
    before = os.environ.get("RAY_AUTH_MODE")
    ctx = ray.init(address="local", num_cpus=2, num_gpus=0, include_dashboard=False, log_to_driver=False,
                   object_store_memory=80 * 2**20)
    try:
        yield ctx.address_info["gcs_address"]
    finally:
        ray.shutdown()
        # Starting the cluster turned on token authentication in this process's environment (Ray's default,
        # which the sweep inherits to join it): it ends with the test.
        if before is None:
            os.environ.pop("RAY_AUTH_MODE", None)
        else:
            os.environ["RAY_AUTH_MODE"] = before


def test_two_job_sweep_on_a_ray_cluster(tmp_path, ray_cluster):
    # Joining by address, Ray uses the cluster's token only when told to (RAY_AUTH_MODE=token, see the fixture).
    out = _sweep(tmp_path, "hydra/launcher=ray_cluster", f"hydra.launcher.ray.init.address={ray_cluster}")
    _two_ok_jobs(tmp_path, out)
    log = out.stdout + out.stderr
    assert "Connected to Ray cluster" in log and len(re.findall(r"#\d \(.*\): 1 CPU, 0 GPU", log)) == 2
    # A job asking for a GPU the cluster does not have is refused at once, naming both sides.
    out = _sweep(tmp_path / "gpu", "hydra/launcher=ray_cluster", f"hydra.launcher.ray.init.address={ray_cluster}",
                 "hydra.launcher.start_timeout_s=0", "+hydra.launcher.ray.remote.num_gpus=1")
    assert out.returncode == 2, out.stdout[-2000:] + out.stderr[-2000:]
    assert re.search(r"asks Ray for 1 CPU, 1 GPU, but no node .* 2 CPU, 0 GPU", out.stderr), out.stderr[-2000:]


def test_two_job_sweep_on_submitit_local(tmp_path):
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher")
    out = _sweep(tmp_path, "hydra/launcher=submitit_local")
    _two_ok_jobs(tmp_path, out)
    assert len(list((tmp_path / "sweep" / ".submitit").glob("*/*_result.pkl"))) == 2  # each ran as its own process


def _run_ok(sweep_dir: Path, sweep: list[str], wandb_mode: str, *extra: str) -> str:
    """`python run.py` with `sweep` into `sweep_dir`, which must succeed; its output."""
    out = subprocess.run([sys.executable, "run.py", *sweep, f"hydra.sweep.dir={sweep_dir}", *extra], cwd=ROOT,
                         capture_output=True, text=True, timeout=300, env={**os.environ, "WANDB_MODE": wandb_mode})
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    return out.stdout + out.stderr


def test_a_simulated_sweep_gives_the_same_rows_in_worker_processes_and_in_one_process(tmp_path):
    """The default path (jobs side by side in worker processes that live for the sweep, twins that differ in their
    SLOs reading one simulation, no W&B run per job) against the per-job path it replaced (one job after another in
    this process, each with its own W&B run): the same rows and points."""
    sweep = ["-m", "experiment=paper_llama3_8b_sharegpt", "engine=unified,semipd_dynamic_paper", "workload.rate=8,24",
             "slo=llama3_8b_sharegpt_tight,llama3_8b_sharegpt_loose", "workload.num_requests=150",
             "loadgen.progress=false"]
    pooled = _run_ok(tmp_path / "pooled", sweep, "offline")
    single = _run_ok(tmp_path / "single", sweep, "offline", "hydra.launcher.n_jobs=1", "wandb.per_job_runs=true")
    assert "8 jobs locally, 2 at a time" in pooled or len(cores.machine_cores()) < 2
    assert "8 jobs locally, 1 at a time" in single
    # W&B: the summary run only, against one run per job beside it
    assert len(list((tmp_path / "pooled" / "wandb").glob("offline-run-*"))) == 1
    assert len(list((tmp_path / "single" / "wandb").glob("offline-run-*"))) == 9
    # Timing and placement differ; every measured value must not.
    volatile = {"started", "finished", "cores", "server_ready_monotonic"}
    a, b = (pd.read_csv(tmp_path / name / "summary.csv").sort_values("job").reset_index(drop=True)
            for name in ("pooled", "single"))
    cols = [c for c in a.columns if c not in volatile]
    pd.testing.assert_frame_equal(a[cols], b[cols])
    for f in ("points.csv", "goodput.csv"):
        assert (tmp_path / "pooled" / f).read_text() == (tmp_path / "single" / f).read_text()
    ra, rb = (pd.read_parquet(tmp_path / name / "requests.parquet").sort_values(["job", "request_id"])
              .reset_index(drop=True) for name in ("pooled", "single"))
    assert set(rb.columns) - set(ra.columns) == {"wandb.per_job_runs"}  # a command-line key tags the rows
    pd.testing.assert_frame_equal(ra, rb[ra.columns])
    # twins that differ only in their SLOs shared a simulation; the dynamic partitioner's, steered by them, only as a
    # replay (its controller, run on the twin's windows, decided as the twin's did)
    backends = {p.parent.name: json.loads((p.parent / "summary.json").read_text())["backend"]
                for p in (tmp_path / "pooled").glob("*/job.json")}
    for engine in ("unified", "semipd_dynamic_paper"):
        cached = [b for name, b in backends.items() if f"engine={engine}," in name and b.get("from_cache")]
        assert len(cached) == 2, (engine, backends.keys())  # one of each rate's twins
        assert all(b.get("replayed_controller", False) == (engine != "unified") for b in cached)


def test_a_pooled_goodput_sweep_shares_its_probes_and_finds_what_one_process_finds(tmp_path):
    """Three searches on two workers: the third's probes may run in the worker the others left idle (exchange.py).
    Whichever process ran a probe, the searches, their probes' rows and the goodput are the same."""
    # unified last: its bisection (6 rates; the others pass at the top of the range) is the one left alone
    sweep = ["-m", "experiment=paper_goodput", "engine=disagg,semipd_uncapped,unified", "workload.num_requests=80",
             "experiment.goodput_tolerance=8", "request_caps=preset", "engine.max_num_seqs=48",
             "loadgen.progress=false"]
    pooled = _run_ok(tmp_path / "pooled", sweep, "disabled")
    _run_ok(tmp_path / "single", sweep, "disabled", "hydra.launcher.n_jobs=1")
    if len(cores.machine_cores()) >= 2:
        assert re.search(r"goodput probes run by workers with no job left: \d+", pooled)
    assert not (tmp_path / "pooled" / ".probe_exchange").exists()
    assert (tmp_path / "pooled" / "goodput.csv").read_text() == (tmp_path / "single" / "goodput.csv").read_text()
    ra, rb = (pd.read_parquet(tmp_path / name / "requests.parquet").sort_values(["job", "probe_rate", "probe_seed",
                                                                                 "request_id"])
              .reset_index(drop=True) for name in ("pooled", "single"))
    pd.testing.assert_frame_equal(ra, rb[ra.columns])
    probes = {}
    for job in (tmp_path / "pooled").glob("*/job.json"):
        a, b = (json.loads((tmp_path / name / job.parent.name / "summary.json").read_text())
                for name in ("pooled", "single"))
        assert a["probes"] == b["probes"]
        probes[job.parent.name] = len(a["probes"])
    assert [n for job, n in probes.items() if "engine=unified" in job][0] >= 10, probes
