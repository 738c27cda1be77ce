"""Fractional CPU shares: one cgroup per worker under CFS bandwidth control.

A share of x% of a unit of n cores is a quota of x/100 * n CPU-seconds per period, so (70, 30) on two cores
gives the prefill worker 1.4 cores of time and the decode worker 0.6, whatever cores the kernel runs them on;
caps that add past 100% overlap as MPS caps do (each may use up to its cap; the kernel shares the rest). The
period is short (`PERIOD_US`, 10 ms) so a throttled worker waits milliseconds, not the default 100 ms, inside
one iteration. A switch is one write of the quota file, effective at once.

cgroup v1 (`cpu.cfs_quota_us` / `cpu.cfs_period_us`) and v2 (`cpu.max`) are both handled, whichever has a
writable cpu controller; `CpuQuota.open()` tries it (a probe cgroup made, written and removed) and says why
not where it cannot. The groups live under the caller's own cgroup, named after the server's pid, and go when
the engine stops; groups of servers that no longer exist are swept on the next start.
"""

from __future__ import annotations

import itertools
import logging
import math
import os
from pathlib import Path
from typing import Optional

log = logging.getLogger(__name__)

PERIOD_US = 10_000
PREFIX = "semipd-"
_ENGINES = itertools.count()  # several engines in one process each get a folder of their own


def _mounts() -> list[tuple[str, str, set[str]]]:
    out = []
    try:
        for line in Path("/proc/mounts").read_text().splitlines():
            parts = line.split()
            if len(parts) >= 4:
                out.append((parts[1], parts[2], set(parts[3].split(","))))
    except OSError:
        pass
    return out


def _own_path(version: int) -> str:
    """This process's cgroup path in the hierarchy of the cpu controller (v1) or the unified one (v2)."""
    try:
        for line in Path("/proc/self/cgroup").read_text().splitlines():
            _, controllers, path = line.split(":", 2)
            if (version == 2 and controllers == "") or (version == 1 and "cpu" in controllers.split(",")):
                return path
    except (OSError, ValueError):
        pass
    return "/"


def threads_for(share_pct: float, cores: int) -> int:
    """Intra-op threads for a worker whose quota is `share_pct`% of `cores`: the cores its quota can keep busy."""
    return max(1, min(cores, math.ceil(share_pct / 100 * cores - 1e-9)))


class CpuQuota:
    """The cpu controller's directory this process may create groups under, v1 or v2."""

    def __init__(self, base: Path, version: int):
        self.base, self.version = base, version
        self.name = f"{PREFIX}{os.getpid()}-{next(_ENGINES)}"  # this engine's folder: the server's pid first

    @classmethod
    def open(cls) -> tuple[Optional[CpuQuota], str]:
        """(controller, "") where groups can be made and quotas written here, else (None, why not)."""
        candidates = []
        for mnt, fstype, opts in _mounts():
            if fstype == "cgroup" and "cpu" in opts:
                candidates.append((Path(mnt) / _own_path(1).lstrip("/"), 1))
            elif fstype == "cgroup2":
                base = Path(mnt) / _own_path(2).lstrip("/")
                try:
                    if "cpu" in (base / "cgroup.controllers").read_text().split():
                        candidates.append((base, 2))
                except OSError:
                    pass
        if not candidates:
            return None, "no cgroup cpu controller is mounted"
        why = []
        for base, version in candidates:
            q = cls(base, version)
            try:
                q._probe()
                return q, ""
            except OSError as e:
                why.append(f"cgroup v{version} at {base}: {e.strerror or e}")
        return None, "; ".join(why)

    def _probe(self) -> None:
        if self.version == 2:
            self._enable_v2()
        path = self.base / f"{PREFIX}probe-{os.getpid()}"
        path.mkdir(exist_ok=True)
        try:
            self.set(path, 0.5)
        finally:
            path.rmdir()

    def _enable_v2(self) -> None:
        ctl = self.base / "cgroup.subtree_control"
        if "cpu" not in ctl.read_text().split():
            ctl.write_text("+cpu")

    # -- groups ----------------------------------------------------------------------------------------
    def engine_dir(self) -> Path:
        return self.base / self.name

    def create(self, worker: str) -> Path:
        """A group for one worker of this server (made fresh; the engine's own group too)."""
        self.sweep()
        parent = self.engine_dir()
        parent.mkdir(exist_ok=True)
        if self.version == 2:
            (parent / "cgroup.subtree_control").write_text("+cpu")
        path = parent / worker
        path.mkdir(exist_ok=True)
        return path

    def set(self, path: Path, cores: float) -> None:
        """Allow `cores` CPUs' worth of time per period (at least 1 ms of it, the kernel's floor)."""
        quota = max(1000, round(cores * PERIOD_US))
        if self.version == 2:
            (path / "cpu.max").write_text(f"{quota} {PERIOD_US}")
        else:
            # v1 refuses a period below the current quota's: lift the quota first.
            (path / "cpu.cfs_quota_us").write_text("-1")
            (path / "cpu.cfs_period_us").write_text(str(PERIOD_US))
            (path / "cpu.cfs_quota_us").write_text(str(quota))

    def quota(self, path: Path) -> float:
        """The cores' worth of time the group may use per period (inf: unlimited)."""
        if self.version == 2:
            q, p = (path / "cpu.max").read_text().split()
            return math.inf if q == "max" else int(q) / int(p)
        q = int((path / "cpu.cfs_quota_us").read_text())
        return math.inf if q < 0 else q / int((path / "cpu.cfs_period_us").read_text())

    @staticmethod
    def attach(path: Path, pid: int) -> None:
        """Move a process (all its threads, and the ones it starts later) into the group."""
        (path / "cgroup.procs").write_text(str(pid))

    def throttled_s(self, path: Path) -> float:
        """Seconds the group's tasks waited for quota so far."""
        stat = dict(line.split() for line in (path / "cpu.stat").read_text().splitlines() if line.strip())
        if self.version == 2:
            return int(stat.get("throttled_usec", 0)) / 1e6
        return int(stat.get("throttled_time", 0)) / 1e9

    def remove(self, parent: Optional[Path] = None) -> None:
        """Remove this engine's groups (their processes are gone, or are moved back to the parent first)."""
        parent = parent or self.engine_dir()
        if not parent.is_dir():
            return
        for child in [p for p in parent.iterdir() if p.is_dir()]:
            self._drain(child)
            try:
                child.rmdir()
            except OSError as e:
                log.warning("could not remove cgroup %s: %s", child, e)
        try:
            parent.rmdir()
        except OSError as e:
            log.warning("could not remove cgroup %s: %s", parent, e)

    def _drain(self, path: Path) -> None:
        try:
            for pid in (path / "cgroup.procs").read_text().split():
                try:
                    (self.base / "cgroup.procs").write_text(pid)
                except OSError:
                    pass  # exited meanwhile
        except OSError:
            pass

    def sweep(self) -> None:
        """Remove the groups of servers that are no longer running (one killed with SIGKILL leaves them)."""
        for d in self.base.glob(f"{PREFIX}*"):
            pid = d.name[len(PREFIX):].split("-")[0]
            if pid.isdigit() and int(pid) != os.getpid() and not Path(f"/proc/{pid}").exists():
                self.remove(d)
