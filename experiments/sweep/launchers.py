"""What the sweep's launchers must know about each job: the cores and GPUs it occupies.

A Hydra launcher's config is one static block for the whole sweep, but what a job occupies depends on the job:
its backend (a simulated job needs one core and no GPU), `experiment.cores_per_job`, its engine's GPUs. So two
presets (conf/hydra/launcher/) run this project's thin launchers (hydra_plugins/semipd_launchers), which load
every job's config first, validate it, size it, and only then start anything:

- `local` (joblib; the default): `n_jobs: -1` (joblib's "all CPUs") runs as many jobs at once as this machine's
  cores hold with each job on cores of its own (cores.py); an explicit `hydra.launcher.n_jobs=N` is checked
  instead. The jobs run in worker processes that live for the whole sweep, each from the config composed when
  the sweep was validated (`composed`); one at a time, in the sweep's own process.
- `ray_cluster` (hydra-ray-launcher's `ray.init` / `ray.remote` keys and its job runner): each job asks Ray for
  the CPUs its engine needs and the GPUs it occupies. A job that no node of the cluster can hold fails after
  `hydra.launcher.start_timeout_s`, naming what it asked for and what the nodes have, instead of waiting forever
  (Ray queues an infeasible task for good, in case an autoscaler adds a node).
"""

from __future__ import annotations

import logging
import os
import shutil
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from omegaconf import DictConfig, OmegaConf, open_dict

from experiments.sweep import cores, exchange
from experiments.sweep.compose import composed

log = logging.getLogger(__name__)

LOCAL_LAUNCHER = "hydra_plugins.semipd_launchers.launchers.LocalLauncher"
RAY_LAUNCHER = "hydra_plugins.semipd_launchers.launchers.RayClusterLauncher"
_SIZING = ("CPUs: experiment.cores_per_job (0: every core of a node for a real engine, 1 for a simulated job); "
           "GPUs: model.tensor_parallel_size for an engine on model.device=cuda or an external engine, none for "
           "backend=sim; hydra.launcher.ray.remote.num_cpus / num_gpus set them for every job")


@dataclass
class RayConf:
    # ray.init(**init). `address: auto` joins the running cluster (`ray start --head`, or $RAY_ADDRESS); HOST:PORT
    # or ray://HOST:10001 a given one; `local` starts one on this machine. Joining a cluster takes no
    # num_cpus / num_gpus / object_store_memory here (Ray refuses them): they belong to `ray start`.
    init: dict[str, Any] = field(default_factory=lambda: {"address": "auto"})
    # ray.remote(**remote) options of every job; num_cpus / num_gpus given here replace the per-job sizing.
    remote: dict[str, Any] = field(default_factory=dict)


@dataclass
class RayClusterLauncherConf:
    _target_: str = RAY_LAUNCHER
    ray: RayConf = field(default_factory=RayConf)
    # How long the sweep waits for the cluster to have a node that can hold each of its jobs (an autoscaling
    # cluster adds one in a few minutes); then it fails, naming what was asked and what the nodes have.
    start_timeout_s: float = 120.0


class LaunchRefused(ValueError):
    """A sweep that cannot run as configured: said before any job starts, naming the config key."""


def refuse(e: Exception) -> None:
    # Hydra prints a launcher's exception with its whole stack; the message is what the user needs.
    print(f"error: {e}", file=sys.stderr)
    raise SystemExit(2) from None


# --- every job's config, before anything starts ------------------------------------------------------------------

def job_configs(hydra_context, config: DictConfig, job_overrides: Sequence[Sequence[str]],
                initial_job_idx: int) -> list[DictConfig]:
    """Each job's composed config, with the job id and number Hydra's launchers give it."""
    out = []
    for i, overrides in enumerate(job_overrides):
        c = composed(hydra_context.config_loader, config, overrides)
        with open_dict(c):
            c.hydra.job.id = f"{c.hydra.job.name}_{initial_job_idx + i}"
            c.hydra.job.num = initial_job_idx + i
        out.append(c)
    return out


def job_label(cfg: DictConfig) -> str:
    from hydra.core.utils import filter_overrides

    return f"#{cfg.hydra.job.num} ({' '.join(filter_overrides(list(cfg.hydra.overrides.task))) or 'no overrides'})"


def jobs_of(configs: Sequence[DictConfig]) -> list:
    """The validated jobs: a wrong value fails the sweep here, naming its job, not after others have run."""
    from experiments.sweep.job import Job

    jobs = []
    for c in configs:
        try:
            jobs.append(Job.from_cfg(c))
        except ValueError as e:
            raise LaunchRefused(f"job {job_label(c)}: {e}") from None
    return jobs


def job_cores(job, available: Optional[int] = None) -> int:
    """Cores the job pins itself to on a machine of `available` cores (default: this one)."""
    return cores.cores_needed(job.backend.name, job.experiment.cores_per_job, available)


def job_gpus(job) -> int:
    """Physical GPUs the job holds while it runs. A simulated job models GPUs it does not use, and this project's
    engine on model.device=cpu uses none; an external engine (vLLM, SGLang) runs on its tensor-parallel GPUs."""
    if job.simulated or not (job.external or str(job.model.device).startswith("cuda")):
        return 0
    return job.num_gpus


# --- local (joblib) ----------------------------------------------------------------------------------------------

def local_n_jobs(n_jobs: int, per_job: Sequence[int], available: Optional[int] = None) -> int:
    """Jobs the `local` launcher runs at once. n_jobs < 0 counts cores as joblib does (-1: all of them, -2: all but
    one) and runs as many jobs as those hold, each on the cores it needs (never more jobs than the sweep has);
    n_jobs > 0 is taken as asked once it fits (cores.check_parallel)."""
    available = available or len(cores.machine_cores())
    widest = max(per_job, default=1)
    if n_jobs < 0:
        usable = max(1, available + 1 + n_jobs)
        return max(1, min(len(per_job), usable // widest))
    if n_jobs == 0:
        raise LaunchRefused("hydra.launcher.n_jobs=0 runs nothing: give N > 0, or -1 for as many jobs as the cores "
                            "hold")
    try:
        cores.check_parallel(n_jobs, widest, available)
    except ValueError as e:
        raise LaunchRefused(str(e)) from None
    return n_jobs


def size_local(launcher, job_overrides, initial_job_idx: int, n_jobs: int) -> tuple[int, list[DictConfig]]:
    """How many jobs run at once, and every job's composed config."""
    from hydra.core.utils import configure_log

    configure_log(launcher.config.hydra.hydra_logging, launcher.config.hydra.verbose)  # so the line below shows
    configs = job_configs(launcher.hydra_context, launcher.config, job_overrides, initial_job_idx)
    per_job = [job_cores(j) for j in jobs_of(configs)]
    n = local_n_jobs(n_jobs, per_job)
    log.info("local launcher: %d job(s) at once, each on %d of this machine's %d cores (hydra.launcher.n_jobs=%d)",
             n, max(per_job, default=1), len(cores.machine_cores()), n_jobs)
    return n, configs


def run_composed(sweep_config: DictConfig, hydra_context, task_function, singleton_state):
    """One job from its composed config: what Hydra's joblib launcher does in a worker, without composing the
    config again there."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.core.singleton import Singleton
    from hydra.core.utils import run_job, setup_globals

    setup_globals()
    Singleton.set_state(singleton_state)
    HydraConfig.instance().set_config(sweep_config)
    return run_job(hydra_context=hydra_context, config=sweep_config, task_function=task_function,
                   job_dir_key="hydra.sweep.dir", job_subdir_key="hydra.sweep.subdir")


def _pool_options(joblib_kwargs: dict[str, Any]) -> dict[str, Any]:
    from hydra_plugins.hydra_joblib_launcher._core import process_joblib_cfg

    options = {k: v for k, v in joblib_kwargs.items() if k not in ("_target_", "n_jobs", "backend")}
    process_joblib_cfg(options)
    return options


def _warm() -> int:
    """What a simulated job imports and reads first (~2.5 s of a fresh interpreter), paid while the sweep is
    still validated."""
    import experiments.sweep.job  # noqa: F401
    import experiments.sweep.simulated  # noqa: F401
    import semipd_engine.sim.build  # noqa: F401
    from experiments.sweep import provenance

    provenance.collect({})  # the package list and git state, read once per process (~1 s)
    return os.getpid()


_PRESTARTED: dict[str, threading.Thread] = {}  # by sweep directory: the thread starting its pool


def prestart_local(config: DictConfig) -> bool:
    """Start the local launcher's pool (its workers and their imports) now, beside the sweep's own start-up
    (composing and checking every job: seconds for a large sweep), when the sweep is simulated (`backend=sim`: one
    job per core, in the pool). Called where the sweep starts (its callback's
    `on_multirun_start`) and again by the launcher (a no-op then). The joblib pool is reused by the launch when its
    size and options are the same; a launch that decides otherwise (real engines run in this process) waits for
    this and lets the idle workers time out. True when it started one (the caller may start the sweep's figure
    process beside it too)."""
    launcher_cfg = OmegaConf.to_container(config.hydra.get("launcher") or {}, resolve=True)
    key = str(config.hydra.sweep.dir)
    if launcher_cfg.get("_target_") != LOCAL_LAUNCHER or key in _PRESTARTED:
        return False
    n = int(launcher_cfg.get("n_jobs", -1))
    n = len(cores.machine_cores()) if n < 0 else n
    if not _simulated(config) or n < 2:
        return False

    def start() -> None:
        from joblib import Parallel, delayed

        try:
            Parallel(n_jobs=n, backend="loky", **_pool_options(launcher_cfg))(delayed(_warm)() for _ in range(n))
        except Exception as e:  # the launch starts its own pool
            log.debug("pool pre-start failed: %s", e)

    t = threading.Thread(target=start, name="pool-prestart", daemon=True)
    t.start()
    _PRESTARTED[key] = t
    return True


_SHARED: dict[str, tuple] = {}  # a worker's unpickled sweep-wide arguments, by digest


def run_pooled(sweep_config: DictConfig, shared: bytes, digest: str, probes: Optional[str] = None):
    """`run_composed` in a pool worker; `shared` is the sweep-wide arguments (Hydra's context, the task function,
    the singletons' state) pickled once by the sweep: each job's task carries those bytes, not the objects
    (pickling them anew was ~20 ms of the sweep's process per job), and a worker unpickles them once. `probes`:
    the sweep's probe exchange (exchange.py), where the job's goodput search may post probes."""
    if digest not in _SHARED:
        from joblib.externals import cloudpickle

        _SHARED.clear()
        _SHARED[digest] = cloudpickle.loads(shared)
    with exchange.active(probes, sweep_config.hydra.job.num):
        return run_composed(sweep_config, *_SHARED[digest])


def _simulated(config: DictConfig, mode: Optional[str] = None) -> bool:
    """The job runs on `backend=sim` (and in experiment `mode`, if given)."""
    try:
        return str(config.backend.name) == "sim" and (mode is None or str(config.experiment.mode) == mode)
    except Exception:  # a config without the project's schema (tests of the launcher alone)
        return False


def shares_probes(config: DictConfig) -> bool:
    """A simulated goodput search: its probes may run in other workers of the pool (exchange.py)."""
    return _simulated(config, "goodput")


def launch_local(launcher, job_overrides: Sequence[Sequence[str]], initial_job_idx: int):
    """Jobs side by side in worker processes that live for the whole sweep (joblib's loky pool: one interpreter
    per parallel slot, its imports paid once), each started from the config composed at validation; one slot
    runs the jobs in this process, one after another (as Hydra's basic launcher does)."""
    from hydra.core.singleton import Singleton
    from hydra.core.utils import filter_overrides, setup_globals
    from joblib import Parallel, delayed

    setup_globals()
    n, configs = size_local(launcher, job_overrides, initial_job_idx, launcher.requested_n_jobs)
    Path(str(launcher.config.hydra.sweep.dir)).mkdir(parents=True, exist_ok=True)
    log.info("Launching %d jobs locally, %d at a time, sweep dir %s", len(configs), n, launcher.config.hydra.sweep.dir)
    for c, overrides in zip(configs, job_overrides):
        log.info("\t#%d : %s", c.hydra.job.num, " ".join(filter_overrides(list(overrides))))
    state = Singleton.get_state()
    prestart = _PRESTARTED.pop(str(launcher.config.hydra.sweep.dir), None)
    if prestart is not None:  # one pool at a time: the launch below reuses the one it started
        prestart.join()
    if n == 1:
        return [run_composed(c, launcher.hydra_context, launcher.task_function, state) for c in configs]
    import hashlib

    from joblib.externals import cloudpickle

    shared = cloudpickle.dumps((launcher.hydra_context, launcher.task_function, state))
    digest = hashlib.blake2b(shared, digest_size=16).hexdigest()
    probes = Path(str(launcher.config.hydra.sweep.dir)).absolute() / ".probe_exchange" \
        if any(shares_probes(c) for c in configs) else None
    tasks = [delayed(run_pooled)(c, shared, digest, str(probes) if probes else None) for c in configs]
    if probes is not None:
        # Queued after every job: a worker starts a helper only once no job is left to start, and the helpers
        # return once every job has finished.
        tasks += [delayed(exchange.serve)(str(probes), len(configs)) for _ in range(n - 1)]
    try:
        results = Parallel(n_jobs=n, backend="loky", **_pool_options(dict(launcher.joblib)))(tasks)
    finally:
        if probes is not None:
            shutil.rmtree(probes, ignore_errors=True)
    if probes is not None:
        log.info("goodput probes run by workers with no job left: %d", sum(results[len(configs):]))
    return results[:len(configs)]


# --- Ray -----------------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Node:
    name: str
    resources: dict[str, float]  # Ray's totals: CPU, GPU, memory (bytes), custom resources

    def describe(self, keys: Sequence[str]) -> str:
        return f"{self.name}: {_amounts({k: self.resources.get(k, 0.0) for k in keys})}"


@dataclass(frozen=True)
class RayRequest:
    num_cpus: float
    num_gpus: float
    memory: Optional[float] = None
    resources: dict[str, float] = field(default_factory=dict)

    def needs(self) -> dict[str, float]:
        """The request in the names of a node's resources."""
        out = {"CPU": float(self.num_cpus), "GPU": float(self.num_gpus), **self.resources}
        if self.memory:
            out["memory"] = float(self.memory)
        return out

    def options(self) -> dict[str, Any]:
        """ray.remote options replacing those of the same name in hydra.launcher.ray.remote."""
        return {"num_cpus": self.num_cpus, "num_gpus": self.num_gpus}

    def fits(self, node: Node) -> bool:
        return all(node.resources.get(k, 0.0) >= v for k, v in self.needs().items() if v)


def _amounts(needs: dict[str, float]) -> str:
    def one(k, v):
        if k == "memory":
            return f"{v / 2**30:.1f} GiB memory"
        return f"{v:g} {k}"

    return ", ".join(one(k, v) for k, v in needs.items())


def ray_request(job, remote: dict[str, Any], nodes: Sequence[Node]) -> RayRequest:
    """What one job asks of Ray: the GPUs it occupies, and the cores its engine pins. A job that takes every core
    (a real engine without experiment.cores_per_job) asks for every CPU of the largest node with its GPUs."""
    gpus = remote.get("num_gpus")
    gpus = job_gpus(job) if gpus is None else gpus
    hosts = [n for n in nodes if n.resources.get("GPU", 0.0) >= gpus] or list(nodes)
    largest = int(max((n.resources.get("CPU", 0.0) for n in hosts), default=0))
    cpus = remote.get("num_cpus")
    cpus = job_cores(job, largest or None) if cpus is None else cpus
    return RayRequest(cpus, gpus, remote.get("memory"), dict(remote.get("resources") or {}))


def cluster_nodes() -> list[Node]:
    import ray

    return [Node(n.get("NodeName") or n.get("NodeManagerAddress", "?"), dict(n.get("Resources", {})))
            for n in ray.nodes() if n.get("Alive")]


def plan_ray(jobs: Sequence, labels: Sequence[str], remote: dict[str, Any], timeout_s: float,
             nodes: Callable[[], list[Node]] = cluster_nodes, sleep: Callable[[float], None] = time.sleep,
             clock: Callable[[], float] = time.monotonic, poll_s: float = 5.0) -> list[RayRequest]:
    """Every job's request, once the cluster has a node that can hold each (waiting up to `timeout_s` for one)."""
    start = clock()
    warned = False
    while True:
        have = nodes()
        requests = [ray_request(j, remote, have) for j in jobs]
        unfit = [i for i, r in enumerate(requests) if not any(r.fits(n) for n in have)]
        if not unfit:
            return requests
        waited = clock() - start
        i, r = unfit[0], requests[unfit[0]]
        keys = list(r.needs())
        what = (f"job {labels[i]} asks Ray for {_amounts(r.needs())}, but no node of the cluster has that "
                f"({len(have)} node(s): {'; '.join(n.describe(keys) for n in have) or 'none'})")
        if len(unfit) > 1:
            what += f"; {len(unfit) - 1} more job(s) do not fit either"
        if waited >= timeout_s:
            raise LaunchRefused(f"{what}. Waited {waited:.0f} s for a node that fits "
                                f"(hydra.launcher.start_timeout_s={timeout_s:g}). {_SIZING}.")
        if not warned:
            log.warning("%s: waiting up to %g s for one to join (hydra.launcher.start_timeout_s)", what, timeout_s)
            warned = True
        sleep(min(poll_s, max(0.0, timeout_s - waited)))


def launch_on_ray(launcher, job_overrides: Sequence[Sequence[str]], initial_job_idx: int):
    """hydra-ray-launcher's launch, with every job sized on its own and checked against the cluster first."""
    try:
        import ray
        from hydra_plugins.hydra_ray_launcher._launcher_util import launch_job_on_ray, start_ray
    except ImportError as e:
        raise LaunchRefused(f"hydra/launcher=ray_cluster needs Ray and hydra-ray-launcher: "
                            f"pip install -e \".[cluster]\" ({e})") from None
    from hydra.core.singleton import Singleton
    from hydra.core.utils import configure_log, setup_globals

    setup_globals()
    cfg = launcher.config
    configure_log(cfg.hydra.hydra_logging, cfg.hydra.verbose)
    Path(str(cfg.hydra.sweep.dir)).mkdir(parents=True, exist_ok=True)
    configs = job_configs(launcher.hydra_context, cfg, job_overrides, initial_job_idx)
    jobs = jobs_of(configs)  # before connecting: a wrong value needs no cluster to be found
    settings = launcher.settings
    init = settings.ray.init
    # The library's launcher adds object_store_memory to every ray.init (a CI default), which Ray refuses when
    # joining a running cluster; here ray.init gets exactly hydra.launcher.ray.init.
    try:
        start_ray(OmegaConf.create(init))
    except ConnectionError as e:
        # Ray only looks for the cluster's token itself when it finds the cluster itself (address auto).
        raise LaunchRefused(f"hydra.launcher.ray.init.address={init.get('address')}: {e}. Start a cluster with "
                            f"`ray start --head`, give its HOST:PORT, or `local` to start one here; a cluster with "
                            f"token authentication (Ray's default) also needs RAY_AUTH_MODE=token and its token "
                            f"here when its address is given") from None
    remote = dict(settings.ray.remote)
    requests = plan_ray(jobs, [job_label(c) for c in configs], remote, settings.start_timeout_s)
    log.info("Ray launcher: %d job(s) on %s, sweep dir %s", len(configs), init.get("address"), cfg.hydra.sweep.dir)
    runs = []
    for c, r in zip(configs, requests):
        log.info("\t%s: %s", job_label(c), _amounts(r.needs()))
        options = OmegaConf.create({**remote, **r.options()})
        runs.append(launch_job_on_ray(launcher.hydra_context, options, c, launcher.task_function,
                                      Singleton.get_state()))
    return [ray.get(run) for run in runs]
