"""`hydra/launcher=local` and `hydra/launcher=ray_cluster`: Hydra's joblib and Ray launchers, with every job's
config loaded, validated and sized before any job starts (experiments/sweep/launchers.py)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Optional

from hydra.core.utils import JobReturn
from hydra.plugins.launcher import Launcher
from hydra.types import HydraContext, TaskFunction
from hydra_plugins.hydra_joblib_launcher.joblib_launcher import JoblibLauncher
from omegaconf import DictConfig


class LocalLauncher(JoblibLauncher):
    """Joblib; `n_jobs: -1` runs as many jobs at once as this machine's cores hold, each on cores of its own."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.requested_n_jobs = int(kwargs.get("n_jobs", -1))

    def setup(self, *, hydra_context: HydraContext, task_function: TaskFunction, config: DictConfig) -> None:
        from experiments.sweep import launchers

        super().setup(hydra_context=hydra_context, task_function=task_function, config=config)
        launchers.prestart_local(config)  # where the sweep's callback has not already

    def launch(self, job_overrides: Sequence[Sequence[str]], initial_job_idx: int) -> Sequence[JobReturn]:
        from experiments.sweep import launchers

        try:
            return launchers.launch_local(self, job_overrides, initial_job_idx)
        except launchers.LaunchRefused as e:
            launchers.refuse(e)


class RayClusterLauncher(Launcher):
    """hydra-ray-launcher's job runner; each job asks Ray for what its engine occupies (never an endless wait)."""

    def __init__(self, ray: DictConfig, start_timeout_s: float) -> None:
        from experiments.sweep.launchers import RayClusterLauncherConf
        from semipd_engine.config import freeze

        self.settings = freeze(RayClusterLauncherConf, {"ray": ray, "start_timeout_s": start_timeout_s})
        self.config: Optional[DictConfig] = None
        self.hydra_context: Optional[HydraContext] = None
        self.task_function: Optional[TaskFunction] = None

    def setup(self, *, hydra_context: HydraContext, task_function: TaskFunction, config: DictConfig) -> None:
        self.config = config
        self.hydra_context = hydra_context
        self.task_function = task_function

    def launch(self, job_overrides: Sequence[Sequence[str]], initial_job_idx: int) -> Sequence[JobReturn]:
        from experiments.sweep import launchers

        try:
            return launchers.launch_on_ray(self, job_overrides, initial_job_idx)
        except launchers.LaunchRefused as e:
            launchers.refuse(e)
