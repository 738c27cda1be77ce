"""Attribution of a goodput ratio to factors: the Shapley arithmetic, and one small job end to end."""

from __future__ import annotations

import json
import math

import pandas as pd
import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from experiments.sweep import conf_store
from experiments.sweep.attribution import shapley
from experiments.sweep.config import FactorConfig


def _game(fn, names):
    import itertools

    return {frozenset(s): fn(frozenset(s)) for k in range(len(names) + 1) for s in itertools.combinations(names, k)}


def test_shapley_splits_additive_effects_exactly_and_interactions_evenly():
    names = ["a", "b", "c"]
    additive = _game(lambda s: 0.3 * ("a" in s) - 0.1 * ("b" in s), names)
    assert shapley(additive, names) == pytest.approx({"a": 0.3, "b": -0.1, "c": 0.0})
    both = _game(lambda s: 1.0 if {"a", "b"} <= s else 0.0, names)  # only together
    phi = shapley(both, names)
    assert phi == pytest.approx({"a": 0.5, "b": 0.5, "c": 0.0})
    assert sum(phi.values()) == pytest.approx(both[frozenset(names)] - both[frozenset()])


def test_a_small_attribution_job_writes_its_tables_and_the_contributions_add_up(tmp_path):
    from experiments.sweep.job import run

    conf_store.register()
    overrides = {"experiment": "paper_attribution", "workload.num_requests": "150", "experiment.goodput_tolerance": "4",
                 "experiment.goodput_high": "40"}
    with initialize_config_dir(config_dir=conf_store.CONF_DIR, version_base=None):
        cfg = compose("config", overrides=[f"{k}={v}" for k, v in overrides.items()] + ["wandb.mode=disabled"])
        OmegaConf.update(cfg, "experiment.attribution.factors", [
            FactorConfig("stack", "own stacks", ["stack=vllm-0.6"], ["stack=auto"]),
            FactorConfig("max_batch", "cap", [], ["engine.max_num_seqs=512"], ["unified"]),
        ], merge=False)
        record = run(cfg, str(tmp_path), overrides)
    assert record["status"] == "ok"
    summary = json.loads((tmp_path / "attribution.json").read_text())
    settings = pd.read_csv(tmp_path / "attribution_settings.csv")
    contrib = pd.read_csv(tmp_path / "attribution.csv")
    assert len(settings) == 4 and set(contrib["factor"]) == {"stack", "max_batch"}
    assert {"at_range_top_unified", "at_range_top_semipd_uncapped"} <= set(settings.columns)
    s = summary["unified"]
    assert math.prod(s["contributions_x"].values()) == pytest.approx(s["ratio_paper_setting"] / s["ratio_like_for_like"])
    # the cap does not apply to semi-PD: its goodput is searched once for both values of that factor
    both = settings.groupby("stack")["goodput_semipd_uncapped"].nunique()
    assert (both == 1).all()
    assert (tmp_path / "attribution.png").stat().st_size > 0


def test_a_searchs_attainment_is_the_jobs():
    from experiments.analysis import request_metrics as M
    from experiments.loadgen.result import measured
    from experiments.sweep import simulated
    from experiments.sweep.attribution import Searcher
    from experiments.sweep.job import Job

    conf_store.register()
    base = {"experiment": "paper_attribution", "workload.num_requests": "200", "slo.tpot_definition": "p90_itl"}
    with initialize_config_dir(config_dir=conf_store.CONF_DIR, version_base=None):
        s = Searcher(base, Job.from_cfg)
        job = s.job("unified", [])
    import dataclasses

    w = dataclasses.replace(job.workload, rate=20.0)
    run, _, _ = simulated.simulation(job.model, job.engine, job.hardware, job.backend, job.loadgen, w)
    _, agg = measured(M.derive(run.frame, job.loadgen.measure_from), job.loadgen, job.slo)
    assert s.attainment(job, 20.0) == pytest.approx(agg.slo_attainment)
    assert s.n_sims == 1
