"""Registers the structured-config schemas with Hydra's ConfigStore."""

from __future__ import annotations

from hydra.core.config_store import ConfigStore

from semipd_engine.config import EngineConfig, ModelConfig, ServeConfig


def register() -> None:
    cs = ConfigStore.instance()
    cs.store(name="serve_schema", node=ServeConfig)
    cs.store(group="engine", name="engine_schema", node=EngineConfig)
    cs.store(group="model", name="model_schema", node=ModelConfig)
