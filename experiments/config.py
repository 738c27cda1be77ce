"""Old import path of the structured-config schemas, which now live in experiments.sweep.config.

Kept only for callers outside experiments/ that still import `experiments.config`
(tests/semipd_engine/test_slo_partitioner.py); new code imports experiments.sweep.config.
Remove once nothing does: `grep -rn "experiments.config\b" --include=*.py .`
"""

from experiments.sweep.config import (  # noqa: F401
    ExperimentConfig,
    LoadgenConfig,
    LoadgenJob,
    RunConfig,
    SLOConfig,
    WandbConfig,
    WorkloadConfig,
)
