"""Jobs that run side by side never share cores.

A latency measurement is only as good as the cores under it. Each job pins itself (and so the engine server
and workers it starts, which inherit the affinity) to a core set of its own:

- `cores_needed(...)`: a real engine takes every core of the machine unless `experiment.cores_per_job` says
  otherwise; a simulated job takes one.
- `check_parallel(...)`: a parallel launcher (joblib `n_jobs`) asking for more concurrent jobs than the machine
  has core sets for is refused at the start of the sweep, with a message saying what would fit. The `local`
  preset's default asks for as many as fit (experiments/sweep/launchers.py).
- `core_slot(...)`: the job takes the first free core set (an exclusive `flock` per core in a machine-wide
  lock folder, so two processes, of one sweep or of two, can never hold the same core), pins itself to it and
  gives it back when done. A job that finds every set taken waits for one rather than share (and says so).
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Optional

log = logging.getLogger(__name__)


# The cores this process was allowed when it started (a container's cpuset, a `taskset`), before any job
# pinned it to fewer.
_START = sorted(os.sched_getaffinity(0))


def machine_cores() -> list[int]:
    return list(_START)


def cores_needed(backend: str, cores_per_job: int, available: Optional[int] = None) -> int:
    n = available or len(machine_cores())
    if cores_per_job > 0:
        return min(cores_per_job, n)
    if backend == "sim":
        return 1  # a simulation is one Python thread; a `profile` one models the profiled machine's cores
    return n  # a real engine uses every core it is given


def launcher_jobs(launcher_cfg) -> Optional[int]:
    """Concurrent jobs a Hydra launcher config runs on this machine (1 for the sequential basic launcher), or None
    for the `local` preset's default, which sizes itself to the jobs' cores (experiments/sweep/launchers.py)."""
    if launcher_cfg is None:
        return 1
    target = str(launcher_cfg.get("_target_", ""))
    n = launcher_cfg.get("n_jobs", 1)
    ours = target.endswith(".semipd_launchers.launchers.LocalLauncher")
    if ours and n is not None and n < 0:
        return None
    if ours or "joblib" in target.lower():
        return os.cpu_count() or 1 if n is None or n < 0 else int(n)
    return 1


def check_parallel(n_jobs: int, per_job: int, available: Optional[int] = None) -> None:
    """Refuse a sweep that would run more jobs at once than the machine has disjoint core sets for."""
    available = available or len(machine_cores())
    slots = max(1, available // per_job)
    if n_jobs > slots:
        raise ValueError(
            f"hydra.launcher.n_jobs={n_jobs} would run {n_jobs} jobs at once, but each job needs {per_job} of this "
            f"machine's {available} cores, so at most {slots} fit without sharing cores (shared cores make "
            f"latencies measure the neighbour). Use hydra.launcher.n_jobs={slots}, or set "
            f"experiment.cores_per_job to give each job fewer cores.")


def slot_cores(slot: int, per_job: int, cores: Optional[list[int]] = None) -> list[int]:
    cores = cores or machine_cores()
    return cores[slot * per_job:(slot + 1) * per_job]


def lock_dir() -> Path:
    """Machine-wide: jobs of different sweeps on one machine must not share cores either."""
    import tempfile

    return Path(tempfile.gettempdir()) / f"semipd-core-locks-{os.getuid()}"


def _try_lock(directory: Path, cores: list[int]) -> Optional[list]:
    handles = []
    for c in cores:
        f = open(directory / f"core{c}.lock", "w")
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            f.close()
            for h in handles:
                fcntl.flock(h, fcntl.LOCK_UN)
                h.close()
            return None
        handles.append(f)
    return handles


@contextlib.contextmanager
def core_slot(per_job: int, directory: Optional[Path] = None, poll_s: float = 0.5) -> Iterator[list[int]]:
    """Hold `per_job` cores of their own (an exclusive lock per core) and pin this process to them for the
    duration of the block. A job needing the whole machine locks every core (so two such jobs, of one sweep
    or two, run one after the other) and pins nothing."""
    cores = machine_cores()
    per_job = min(per_job, len(cores))
    directory = Path(directory) if directory is not None else lock_dir()
    directory.mkdir(parents=True, exist_ok=True)
    handles, mine, waited = None, None, False
    while handles is None:
        for i in range(len(cores) // per_job):
            mine = slot_cores(i, per_job, cores)
            handles = _try_lock(directory, mine)
            if handles is not None:
                break
        if handles is None:
            if not waited:
                log.warning("every core set of %d core(s) is taken by another job: waiting for one", per_job)
                waited = True
            time.sleep(poll_s)
    before = os.sched_getaffinity(0)
    if set(mine) != before:
        os.sched_setaffinity(0, mine)  # the engine server and its workers inherit it
    try:
        yield mine
    finally:
        if set(mine) != before:
            os.sched_setaffinity(0, before)
        for h in handles:
            fcntl.flock(h, fcntl.LOCK_UN)
            h.close()
