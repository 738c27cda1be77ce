"""Jobs side by side never share cores: a parallel launch that cannot give each job its own cores is refused,
and concurrent jobs hold disjoint core sets."""

from __future__ import annotations

import os

import pytest
from omegaconf import OmegaConf

from experiments.sweep import cores
from experiments.sweep.aggregate import check_launch


def test_too_many_parallel_jobs_are_refused_with_what_would_fit():
    cores.check_parallel(2, 1, available=2)
    with pytest.raises(ValueError, match=r"n_jobs=3 .* at most 2 fit .* hydra.launcher.n_jobs=2"):
        cores.check_parallel(3, 1, available=2)
    with pytest.raises(ValueError, match="each job needs 2 of this machine's 2 cores"):
        cores.check_parallel(2, 2, available=2)


def test_cores_each_job_needs():
    assert cores.cores_needed("real", 0, available=8) == 8  # a real engine takes the machine
    assert cores.cores_needed("sim", 0, available=8) == 1  # either cost model: the profile says what it models
    assert cores.cores_needed("real", 2, available=8) == 2
    assert cores.launcher_jobs(OmegaConf.create({"_target_": "hydra_plugins.hydra_joblib_launcher.x.JoblibLauncher",
                                                 "n_jobs": 3})) == 3
    assert cores.launcher_jobs(OmegaConf.create({"_target_": "hydra._internal.core_plugins.BasicLauncher"})) == 1


def _launch(n_jobs, backend="real", params=None, per_job=0):
    return OmegaConf.create({
        "hydra": {"launcher": {"_target_": "hydra_plugins.hydra_joblib_launcher.joblib_launcher.JoblibLauncher",
                               "n_jobs": n_jobs}, "sweeper": {"params": params or {}}},
        "backend": {"name": backend, "cost_model": "roofline"}, "experiment": {"cores_per_job": per_job}})


def test_the_sweep_checks_its_launch_before_any_job():
    n = len(os.sched_getaffinity(0))
    check_launch(_launch(1))
    check_launch(_launch(n, backend="sim"))  # simulated jobs: one core each
    with pytest.raises(ValueError, match="at most 1 fit"):
        check_launch(_launch(2))  # two real engines on one machine
    with pytest.raises(ValueError):
        check_launch(_launch(n, backend="sim", params={"backend": "real,sim"}))  # the real ones count


@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="needs two cores")
def test_concurrent_jobs_hold_disjoint_core_sets(tmp_path):
    before = os.sched_getaffinity(0)
    with cores.core_slot(1, tmp_path) as a:
        assert os.sched_getaffinity(0) == set(a)
        with cores.core_slot(1, tmp_path) as b:  # a second job (a second lock holder) meanwhile
            assert len(a) == len(b) == 1 and set(a).isdisjoint(b)
    assert os.sched_getaffinity(0) == before
    with cores.core_slot(len(before), tmp_path) as everything:  # the whole machine: locked, nothing to pin
        assert set(everything) == before and os.sched_getaffinity(0) == before
        assert cores._try_lock(tmp_path, [sorted(before)[0]]) is None  # a second job would wait
