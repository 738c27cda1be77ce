"""Config builders for the experiments tests: frozen load-generator configs and the composed Hydra config."""

from __future__ import annotations

from hydra import compose, initialize_config_dir

from experiments.sweep import conf_store
from experiments.sweep.config import LoadgenConfig, SLOConfig, WorkloadConfig
from semipd_engine.config import freeze

conf_store.register()
SLO = freeze(SLOConfig, {})


def workload_cfg(**kw):
    return freeze(WorkloadConfig, kw)


def loadgen_cfg(url, **kw):
    """Quiet, tokenizer-free client settings (prompts of approximate length, fastest to build); every request
    counted (no warm-up requests) unless a test asks for them."""
    return freeze(LoadgenConfig, {"base_url": url, "progress": False, "tokenizer": "none", "warmup_requests": 0,
                                  **kw})


def compose_run(overrides=(), hydra: bool = False):
    """conf/config.yaml composed as `python run.py OVERRIDES` would (schemas validated); with `hydra`, the
    `hydra` node too (sweeper params, the command line's overrides)."""
    with initialize_config_dir(config_dir=conf_store.CONF_DIR, version_base=None):
        return compose("config", overrides=list(overrides), return_hydra_config=hydra)
