"""Registers the experiment schemas with Hydra's ConfigStore (engine ones included)."""

from __future__ import annotations

from pathlib import Path

from hydra.core.config_store import ConfigStore

from experiments.sweep.config import (
    ExperimentConfig,
    LoadgenConfig,
    LoadgenJob,
    RunConfig,
    SLOConfig,
    WandbConfig,
    WorkloadConfig,
)
from experiments.sweep.launchers import RayClusterLauncherConf
from semipd_engine import conf_store as engine_store
from semipd_engine.sim.config import BackendConfig, HardwareConfig

CONF_DIR = str(Path(__file__).resolve().parents[2] / "conf")  # the repository's conf/


def register() -> None:
    engine_store.register()
    cs = ConfigStore.instance()
    cs.store(name="loadgen_schema", node=LoadgenJob)
    cs.store(name="run_schema", node=RunConfig)
    cs.store(group="workload", name="workload_schema", node=WorkloadConfig)
    cs.store(group="slo", name="slo_schema", node=SLOConfig)
    cs.store(group="experiment", name="experiment_schema", node=ExperimentConfig)
    cs.store(group="loadgen", name="loadgen_schema", node=LoadgenConfig)
    cs.store(group="wandb", name="wandb_schema", node=WandbConfig)
    cs.store(group="backend", name="backend_schema", node=BackendConfig)
    cs.store(group="hardware", name="hardware_schema", node=HardwareConfig)
    # conf/hydra/launcher/ray_cluster.yaml: hydra-ray-launcher's keys plus this project's start timeout.
    cs.store(group="hydra/launcher", name="ray_cluster_schema", node=RayClusterLauncherConf)
