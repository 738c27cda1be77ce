"""Was the host quiet during a measurement? CPU time taken by processes outside the job, steal, load average.

The client self-check says whether the load generator kept its schedule; it cannot see another process that
slows the engine. `HostMonitor` samples, over the load run:
  - the busy time of the job's cores (`/proc/stat` per-CPU lines: user, nice, system, irq, softirq),
  - the CPU time of the job's own process tree (the job process, its engine server and workers),
  - steal time on those cores (a hypervisor running someone else), and the 1-minute load average.
`foreign_cpu_frac` = (busy - own) / (wall x cores): the share of the job's cores that something else used.
A run is flagged when it exceeds `max_interference` (or steal exceeds `max_steal`). Linux only; elsewhere the
check reports itself as unavailable and does not invalidate the run.
"""

from __future__ import annotations

import os
import time
from typing import Any, Optional

TICK = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def _cpu_times(cores: set[int]) -> Optional[tuple[float, float]]:
    """(busy seconds, steal seconds) summed over `cores`, from /proc/stat."""
    try:
        with open("/proc/stat") as f:
            lines = f.read().splitlines()
    except OSError:
        return None
    busy = steal = 0.0
    for line in lines:
        if not line.startswith("cpu") or line.startswith("cpu "):
            continue
        name, *vals = line.split()
        if int(name[3:]) not in cores:
            continue
        v = [int(x) for x in vals] + [0] * 10
        # user nice system idle iowait irq softirq steal guest guest_nice (guest is inside user)
        busy += v[0] + v[1] + v[2] + v[5] + v[6]
        steal += v[7]
    return busy / TICK, steal / TICK


def _proc_stat(pid: int) -> Optional[tuple[int, float]]:
    """(parent pid, CPU seconds of the process and of its reaped children) of a process."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            data = f.read()
    except OSError:
        return None
    rest = data[data.rfind(")") + 2:].split()  # the command name may contain spaces and parentheses
    return int(rest[1]), (int(rest[11]) + int(rest[12]) + int(rest[13]) + int(rest[14])) / TICK


def _tree_cpu(root: int) -> dict[int, float]:
    """CPU seconds of `root` and every descendant, by pid."""
    parents, cpu = {}, {}
    for name in os.listdir("/proc"):
        if name.isdigit():
            st = _proc_stat(int(name))
            if st is not None:
                parents[int(name)], cpu[int(name)] = st
    tree, frontier = {root}, [root]
    children: dict[int, list[int]] = {}
    for pid, ppid in parents.items():
        children.setdefault(ppid, []).append(pid)
    while frontier:
        for c in children.get(frontier.pop(), ()):
            if c not in tree:
                tree.add(c)
                frontier.append(c)
    return {pid: cpu[pid] for pid in tree if pid in cpu}


class HostMonitor:
    """`with HostMonitor() as mon: ...load...`, then `mon.result()`.

    Two snapshots (start, end), no sampling thread: a thread walking /proc in the load generator's process
    would steal its event loop's time. Processes that exit in between count through their parent's
    `cutime`/`cstime` once reaped (a worker that dies unreaped mid-run is missed, which errs towards
    flagging the run).
    """

    def __init__(self, root_pid: Optional[int] = None, cores: Optional[set[int]] = None,
                 max_interference: float = 0.1, max_steal: float = 0.05, also: tuple[int, ...] = ()):
        self.root = root_pid or os.getpid()
        self.also = tuple(also)  # other process trees that belong to the job (an attached local server)
        self.cores = set(cores) if cores is not None else set(os.sched_getaffinity(0))
        self.max_interference, self.max_steal = max_interference, max_steal
        self.available = os.path.isfile("/proc/stat")
        self._t0: Optional[float] = None
        self._result: Optional[dict[str, Any]] = None

    def __enter__(self) -> HostMonitor:
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def start(self) -> None:
        self._result = None
        if not self.available:
            return
        self._own0 = self._own()
        self._cpu0 = _cpu_times(self.cores)
        self._load0 = os.getloadavg()[0]
        self._t0 = time.monotonic()

    def stop(self) -> dict[str, Any]:
        if self._result is not None:
            return self._result
        if not self.available or self._t0 is None:
            self._result = {"checked": False, "valid": True, "reasons": [], "note": "no /proc: host not checked"}
            return self._result
        wall = time.monotonic() - self._t0
        cpu1 = _cpu_times(self.cores)
        own1 = self._own()
        busy = cpu1[0] - self._cpu0[0]
        steal = cpu1[1] - self._cpu0[1]
        # A process alive at both ends counts its difference; one born in between counts whole.
        own = sum(t - self._own0.get(pid, 0.0) for pid, t in own1.items())
        capacity = max(wall * len(self.cores), 1e-9)
        foreign = max(0.0, busy - own)
        res: dict[str, Any] = {
            "checked": True, "wall_s": wall, "cores": sorted(self.cores), "busy_cpu_s": busy, "own_cpu_s": own,
            "foreign_cpu_s": foreign, "foreign_cpu_frac": foreign / capacity, "steal_frac": steal / capacity,
            "own_cpu_frac": own / capacity, "loadavg_1m_start": self._load0, "loadavg_1m_end": os.getloadavg()[0],
            "max_interference": self.max_interference, "max_steal": self.max_steal, "reasons": [],
        }
        if res["foreign_cpu_frac"] > self.max_interference:
            res["reasons"].append(f"host interference: other processes used {100 * res['foreign_cpu_frac']:.0f}% "
                                  f"of the job's {len(self.cores)} core(s) during the load "
                                  f"(limit {100 * self.max_interference:.0f}%)")
        if res["steal_frac"] > self.max_steal:
            res["reasons"].append(f"CPU steal {100 * res['steal_frac']:.0f}% of the job's cores "
                                  f"(limit {100 * self.max_steal:.0f}%)")
        res["valid"] = not res["reasons"]
        self._result = res
        return res

    def _own(self) -> dict[int, float]:
        own: dict[int, float] = {}
        for root in (self.root, *self.also):
            own.update(_tree_cpu(root))
        return own

    def result(self) -> dict[str, Any]:
        return self.stop()
