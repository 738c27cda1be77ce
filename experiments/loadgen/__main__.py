"""`python -m experiments.loadgen`: one load run against any OpenAI-compatible server.

    python -m experiments.loadgen base_url=http://127.0.0.1:8000 workload=synthetic \
        workload.rate=4 workload.num_requests=200 output_dir=DIR

Composes conf/loadgen.yaml (the workload and slo groups included), runs the load
and prints the summary; exits 2 on an unreachable server or a bad workload.
"""

from __future__ import annotations

import logging
import sys

from experiments.loadgen.client import LoadgenError, format_summary, run_loadgen


def _main_from_hydra(cfg) -> None:
    from omegaconf import OmegaConf

    from experiments.sweep.config import LoadgenConfig, SLOConfig, WorkloadConfig
    from semipd_engine.config import freeze

    container = OmegaConf.to_container(cfg, resolve=True)
    lc = dict(container["loadgen"])
    for key in ("base_url", "output_dir", "model"):  # top-level shorthands win
        if container.get(key) is not None:
            lc[key] = container[key]
    lcfg, wcfg, slo = freeze(LoadgenConfig, lc), freeze(WorkloadConfig, cfg.workload), freeze(SLOConfig, cfg.slo)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    try:
        summary = run_loadgen(lcfg, wcfg, slo, lcfg.output_dir, container)
    except (LoadgenError, ValueError, FileNotFoundError) as e:
        print(f"experiments.loadgen: error: {e}", file=sys.stderr)
        sys.exit(2)
    print(format_summary(summary))
    if lcfg.output_dir:
        print(f"wrote {lcfg.output_dir}/requests.parquet and summary.json")


def main() -> None:
    import hydra

    from experiments.sweep import conf_store

    conf_store.register()
    hydra.main(version_base=None, config_path=conf_store.CONF_DIR, config_name="loadgen")(_main_from_hydra)()


if __name__ == "__main__":
    main()
