"""`python run.py` runs the embedded default sweep; any Hydra override or multirun works.

    python run.py                                          # the demo sweep (every engine x a few rates)
    python run.py -m engine=unified,unified_chunked workload.rate=1,2,4
    python run.py experiment=single engine=unified workload.rate=2
"""

from __future__ import annotations

import hydra
from omegaconf import DictConfig

from experiments.sweep import conf_store

conf_store.register()


@hydra.main(version_base=None, config_path="conf", config_name="config")
def main(cfg: DictConfig) -> None:
    from pathlib import Path

    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    from experiments.sweep.job import run

    hc = HydraConfig.get()
    overrides = {}
    for o in hc.overrides.task:
        key, _, value = o.lstrip("+~").partition("=")
        if not key.startswith("hydra"):
            overrides[key] = value
    multirun = hc.mode == RunMode.MULTIRUN
    record = run(cfg, hc.runtime.output_dir, overrides, hc.sweep.dir if multirun else None)
    if not multirun:
        from experiments.sweep.aggregate import finish_sweep

        finish_sweep(Path(hc.runtime.output_dir), None)
    return record.get("slo_attainment")


def _entry() -> None:
    import sys

    from experiments.sweep.job import JobInterrupted

    try:
        main()
    except (JobInterrupted, KeyboardInterrupt) as e:
        # The interrupted job is recorded as `interrupted` and finished ones are kept: say how to go on, without
        # a traceback through Hydra's launcher.
        print(f"run.py: interrupted ({str(e) or type(e).__name__}); finished jobs are kept. Run the same command "
              f"with hydra.sweep.dir=<the sweep directory> to measure the rest (finished jobs are skipped).",
              file=sys.stderr)
        sys.exit(130)


if __name__ == "__main__":
    _entry()
