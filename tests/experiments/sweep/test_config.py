"""The Hydra configs over the structured schemas: every preset and option composes, bad overrides fail."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import yaml
from hydra.errors import ConfigCompositionException

from experiments.sweep.config import ExperimentConfig
from semipd_engine.config import EngineConfig, freeze
from semipd_engine.topology.engines import check_engine_config, engine_names
from tests.helpers.experiment_configs import compose_run

CONF = Path(__file__).resolve().parents[3] / "conf"


def _leaves(d: dict, prefix: str = ""):
    for k, v in d.items():
        if isinstance(v, dict):
            yield from _leaves(v, f"{prefix}{k}.")
        else:
            yield f"{prefix}{k}", v


def _get(cfg, dotted: str):
    for k in dotted.split("."):
        cfg = cfg[k]
    return cfg


@pytest.mark.parametrize("preset", sorted(p.stem for p in (CONF / "experiment").glob("*.yaml")))
def test_every_experiment_preset_composes(preset):
    cfg = compose_run([f"experiment={preset}"])
    assert cfg.experiment.name == preset
    assert cfg.experiment.mode in ("single", "goodput", "attribution")
    # What the preset sets outside hydra: lands in the composed config.
    spec = yaml.safe_load((CONF / "experiment" / f"{preset}.yaml").read_text())
    for key, value in _leaves({k: v for k, v in spec.items() if k not in ("defaults", "hydra")}):
        assert _get(cfg, key) == value, key
    assert list(cfg.experiment.slo_scales) == ExperimentConfig().slo_scales  # no preset overrides the grid


@pytest.mark.parametrize("group", ["engine", "model", "workload", "slo"])
def test_every_group_option_composes(group):
    options = sorted((CONF / group).glob("*.yaml"))
    assert options
    for f in options:
        cfg = compose_run(["experiment=single", f"{group}={f.stem}"])  # the demo sets its own workload and SLOs
        if group == "engine":  # a named composition of a registered engine (semipd_uncapped: semipd), or external
            assert cfg.engine.name in engine_names(), f.name
            if "???" not in f.read_text():  # and it sets no key its engine would ignore
                check_engine_config(freeze(EngineConfig, cfg.engine))
        elif group == "workload":  # a workload's loader, or a variant of one (mooncake_llama3_8b: mooncake)
            assert f.stem == cfg.workload.name or f.stem.startswith(cfg.workload.name + "_"), f.name
        else:
            assert cfg[group].name == f.stem
        spec = yaml.safe_load(f.read_text())
        for key, value in _leaves({k: v for k, v in spec.items() if k != "defaults"}):
            if value == "???":  # a mandatory value (model.path, workload.path) the user supplies
                continue
            if isinstance(value, str) and value.startswith("${oc.env:"):  # from the environment, else its default
                var = value[len("${oc.env:"):].split(",")[0].rstrip("}")
                assert _get(cfg[group], key) == os.environ.get(var, ""), (f.name, key)
                continue
            assert _get(cfg[group], key) == value, (f.name, key)


@pytest.mark.parametrize("override,reason", [
    ("engine.bogus=1", "Key 'bogus' not in 'EngineConfig'"),
    ("workload.rate=fast", "Value 'fast' of type 'str' could not be converted to Float"),
    ("engine=nonexistent", "Could not find 'engine/nonexistent'"),
    ("slo.ttft_s=[1]", "could not be converted to Float\n    full_key: slo.ttft_s"),
])
def test_bad_overrides_fail_naming_the_key(override, reason):
    with pytest.raises(ConfigCompositionException) as e:
        compose_run([override])
    assert reason in str(e.value) + str(e.value.__cause__)


def test_aggregate_callback_target_resolves():
    """conf/config.yaml names the sweep callback by import path: it must exist."""
    from hydra.utils import get_class

    from experiments.sweep.aggregate import AggregateCallback

    target = yaml.safe_load((CONF / "config.yaml").read_text())["hydra"]["callbacks"]["aggregate"]["_target_"]
    assert get_class(target) is AggregateCallback


def test_request_caps_paper_gives_each_system_its_own_cap():
    files = sorted((CONF / "request_caps_engine").glob("*.yaml"))
    caps = {f.stem.split("_", 1)[1]: yaml.safe_load(f.read_text())["max_num_seqs"] for f in files}
    options = {f.stem for f in (CONF / "request_caps").glob("*.yaml")}
    for f in files:  # each names a request_caps option and an engine preset, or it would never be picked
        option, engine = f.stem.split("_", 1)
        assert option in options and (CONF / "engine" / f"{engine}.yaml").is_file(), f.name
    assert caps["unified"] == 512 and caps["disagg"] == 1024 and caps["semipd_uncapped"] == 4096
    for engine, cap in caps.items():
        assert compose_run(["experiment=paper_goodput", f"engine={engine}"]).engine.max_num_seqs == cap
        # the command line sets one cap for all; an experiment's own value does not mask the system's
        assert compose_run(["experiment=paper_goodput", f"engine={engine}", "engine.max_num_seqs=77"]
                           ).engine.max_num_seqs == 77
        assert compose_run(["experiment=prefix_sharing", "request_caps=paper", f"engine={engine}"]
                           ).engine.max_num_seqs == cap
    # an engine without a file keeps its preset's cap; request_caps=preset turns it off
    assert compose_run(["experiment=paper_goodput", "engine=semipd"]).engine.max_num_seqs == EngineConfig().max_num_seqs
    assert compose_run(["experiment=prefix_sharing", "engine=unified"]).engine.max_num_seqs == 256
    assert compose_run(["experiment=paper_goodput", "request_caps=preset", "engine=unified"]
                       ).engine.max_num_seqs == EngineConfig().max_num_seqs
