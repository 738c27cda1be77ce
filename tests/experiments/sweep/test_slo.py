"""SLOs of a job: fixed ones pass through; scaled ones multiply a baseline measured once and cached."""

from __future__ import annotations

import json

import pytest

from experiments.sweep import slo as slo_module
from experiments.sweep.config import SLOConfig
from experiments.sweep.slo import baseline_key, resolve_slo
from semipd_engine.config import ModelConfig, freeze
from tests.helpers.experiment_configs import workload_cfg

MACHINE = {"cpu": "test cpu", "cores": 2}


@pytest.fixture
def measurements(tmp_path, monkeypatch):
    """No server: the baseline measurement is stubbed and counted; the cache lives in tmp_path."""
    monkeypatch.setenv("SEMIPD_CACHE", str(tmp_path))
    calls = []

    def measure(model_cfg, engine_cfg, server_cfg, wcfg, lcfg):
        calls.append(wcfg)
        return {"ttft_s": 0.04, "tpot_s": 0.002}

    monkeypatch.setattr(slo_module, "measure_baseline", measure)
    return calls


def test_fixed_slo_is_used_as_given(measurements):
    slo = freeze(SLOConfig, {"ttft_s": 0.3, "tpot_s": 0.05})
    assert resolve_slo(slo, None, None, None, None, None, MACHINE) == {"ttft_s": 0.3, "tpot_s": 0.05, "scale": None}
    assert not measurements


def test_scaled_slo_measures_once_then_reads_the_cache(measurements, tmp_path):
    model, wcfg = freeze(ModelConfig, {}), workload_cfg(prompt_mean=100.0, output_mean=200.0)
    slo = freeze(SLOConfig, {"scale": 7.5})
    expected = {"ttft_s": 7.5 * 0.04, "tpot_s": 7.5 * 0.002, "scale": 7.5, "baseline_ttft_s": 0.04,
                "baseline_tpot_s": 0.002}
    assert resolve_slo(slo, model, None, None, wcfg, None, MACHINE) == pytest.approx(expected)
    cache = json.loads((tmp_path / "slo_baselines.json").read_text())
    assert cache == {baseline_key(model, wcfg, MACHINE): {"ttft_s": 0.04, "tpot_s": 0.002}}
    loose = freeze(SLOConfig, {"scale": 10.0})
    assert resolve_slo(loose, model, None, None, wcfg, None, MACHINE)["ttft_s"] == pytest.approx(0.4)
    assert len(measurements) == 1  # the second job reused the cached baseline
    # Another workload shape is another baseline.
    resolve_slo(slo, model, None, None, workload_cfg(prompt_mean=50.0), None, MACHINE)
    assert len(measurements) == 2


def test_baseline_key_names_what_the_baseline_depends_on():
    model, wcfg = freeze(ModelConfig, {"name": "tiny", "dtype": "float32"}), workload_cfg(length_scale=0.5)
    assert baseline_key(model, wcfg, {"cpu": "X", "cores": 2, "gpus": None}) == \
        f"tiny|float32|X|2|None|p{161.3 * 0.5:.0f}|o{338.0 * 0.5:.0f}"
