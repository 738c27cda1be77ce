"""`python -m semipd_engine.serve engine=unified model=tiny server.port=8000`."""

from __future__ import annotations

import asyncio
import logging
import os
import sys

import hydra
from omegaconf import DictConfig

from semipd_engine import conf_store
from semipd_engine.config import EngineConfig, ModelConfig, ServerConfig, freeze

CONF_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "conf")
conf_store.register()


def serve(cfg: DictConfig) -> None:
    from semipd_engine.model import dtype, resolve
    from semipd_engine.process.engine_client import make_engine
    from semipd_engine.serving.server import run_server

    model_cfg, engine_cfg = freeze(ModelConfig, cfg.model), freeze(EngineConfig, cfg.engine)
    server_cfg = freeze(ServerConfig, cfg.server)
    logging.basicConfig(level=server_cfg.log_level, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    # Resolved here, once: every worker process then loads the same concrete dtype without probing again.
    model_cfg, choice = dtype.resolve(model_cfg)
    logging.getLogger(__name__).info("%s", dtype.describe(choice))
    loaded = resolve(model_cfg)
    engine = make_engine(model_cfg, engine_cfg)
    name = server_cfg.served_model_name or (os.path.basename(os.path.normpath(model_cfg.path))
                                            if model_cfg.path else model_cfg.name)
    asyncio.run(run_server(engine, loaded.tokenizer, loaded.spec.vocab_size, name, server_cfg))


@hydra.main(version_base=None, config_path=CONF_DIR, config_name="serve")
def main(cfg: DictConfig) -> None:
    try:
        serve(cfg)
    except Exception as e:  # a clear one-line reason for scripts that launch us
        logging.getLogger(__name__).exception("server failed")
        print(f"semipd_engine.serve: {type(e).__name__}: {e}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
