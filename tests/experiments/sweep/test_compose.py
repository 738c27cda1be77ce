"""Each job of a sweep composed once; jobs that differ in plain values composed from one shared config, equal
to what Hydra composes whole."""

from __future__ import annotations

import pytest
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.errors import ConfigCompositionException
from omegaconf import OmegaConf

from experiments.sweep import compose as C
from experiments.sweep import conf_store


def test_each_job_is_composed_once_per_sweep():
    calls = []

    class Loader:
        def load_sweep_config(self, master, overrides):
            calls.append(list(overrides))
            return OmegaConf.create({"o": list(overrides)})

    master, other = OmegaConf.create({"a": 1}), OmegaConf.create({"a": 1})
    first = C.composed(Loader(), master, ["x=1"])
    assert C.composed(Loader(), master, ["x=1"]) is first and calls == [["x=1"]]
    C.composed(Loader(), master, ["x=2"])
    assert calls == [["x=1"], ["x=2"]]
    # another sweep (another master config) never reads the first one's jobs
    assert C.composed(Loader(), other, ["x=1"]) is not first and len(calls) == 3


@pytest.fixture
def hydra_sweep():
    """Hydra's own config loader and a master config, as a `-m` run of run.py has them."""
    conf_store.register()
    with initialize_config_dir(config_dir=conf_store.CONF_DIR, version_base=None):
        master = compose("config", overrides=["experiment=paper_llama3_8b_sharegpt"], return_hydra_config=True)
        yield GlobalHydra.instance().config_loader(), master


def _same(a, b) -> None:
    assert OmegaConf.to_yaml(a) == OmegaConf.to_yaml(b)  # every key, in order, interpolations unresolved
    assert OmegaConf.is_struct(a) and OmegaConf.is_struct(b)
    assert OmegaConf.is_readonly(a.hydra) == OmegaConf.is_readonly(b.hydra)
    assert a.hydra.job.override_dirname == b.hydra.job.override_dirname


def test_jobs_composed_from_a_shared_config_equal_hydras_whole_composition(hydra_sweep):
    loader, master = hydra_sweep
    jobs = [[f"engine={e}", f"slo=llama3_8b_sharegpt_{s}", f"workload.rate={r}", "engine.max_num_seqs=64",
             "experiment=paper_llama3_8b_sharegpt"]
            for e in ("unified", "disagg") for s in ("tight", "loose") for r in (4, 12)]
    # forms that Hydra composes whole: a `+` key, a top-level value, a group after a value
    jobs += [["engine=semipd", "+workload.extra=3", "workload.rate=2"], ["results_dir=elsewhere", "engine=unified"],
             ["workload.rate=5", "engine=semipd_uncapped"]]
    fast = [C.composed(loader, master, j) for j in jobs]
    # the four engine x SLO configs of the first jobs; the `+` job's and the last job's (their values applied)
    assert len(C._BASES) == 6
    for job, cfg in zip(jobs, fast):
        _same(cfg, loader.load_sweep_config(master, job))
    assert fast[1].workload.rate == 12 and fast[0].workload.rate == 4 and fast[0].engine.max_num_seqs == 64
    # the copies are the jobs' own: a value set in one reaches no other
    fast[0].workload.rate = 99
    assert fast[2].workload.rate == 4


def test_a_wrong_value_key_fails_as_hydra_says_it(hydra_sweep):
    loader, master = hydra_sweep
    job = ["engine=unified", "workload.rat=3"]
    with pytest.raises(ConfigCompositionException) as whole:
        loader.load_sweep_config(master, job)
    with pytest.raises(ConfigCompositionException) as shared:
        C.composed(loader, master, job)
    assert str(shared.value) == str(whole.value) and "workload.rat" in str(shared.value)


def test_a_job_composed_before_the_sweep_dir_is_resolved_lands_in_the_sweeps_dir(hydra_sweep):
    # `${now:}` in hydra.sweep.dir: the jobs of a goodput sweep are composed (validation) before anything asks
    # for the sweep's directory; each resolved it at its own start and the sweep's end found no job.
    import time

    loader, master = hydra_sweep
    job = C.composed(loader, master, ["engine=disagg", "experiment=paper_llama3_8b_sharegpt"])
    time.sleep(1.1)
    sweep_dir = master.hydra.sweep.dir
    time.sleep(1.1)
    assert job.hydra.sweep.dir == sweep_dir
