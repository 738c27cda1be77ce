"""Compute shares for semi-PD's prefill and decode workers.

A partition is (x, y): the prefill and decode workers' percentage caps of the
device. They are caps, so x + y may exceed 100; (100, 100) is uncapped.

Backends:
- `cpu_affinity` (default off-GPU): prefill's cap is round(x% of the cores) from the
  front, decode's round(y%) from the back, at least one each; the worker pins itself
  with `os.sched_setaffinity` and sizes torch's thread pool to its cores. Changing a
  share is two syscalls at an iteration boundary, so a switch needs no new process.
  Where the caps overlap (x + y > 100), two thread pools on the same cores thrash:
  spinning OpenMP threads that lose their core stall every barrier (measured: (100, 100)
  ran ~11x slower than (50, 50) on 2 cores). So the cores of both caps are divided in
  proportion to the caps (`thread_counts`, the way MPS divides SMs between clients
  whose caps add past 100% while both run) and each worker is pinned to its part
  (`pinned_sets`): the pools together never outnumber the cores.
- `cpu_quota` (default off-GPU where a cgroup cpu controller is writable): a share is
  CPU *time*, not cores: each worker in its own cgroup with a CFS quota of x% of the
  cores per 10 ms period (`cpu_quota.py`), unpinned, with as many threads as its quota
  can keep busy. (70, 30) on two cores is 1.4 and 0.6 cores' worth, which core sets
  cannot express; caps that add past 100 overlap as MPS caps do. A switch is a write of
  the quota file. `auto` falls back to `cpu_affinity`, saying why, where it cannot run.
- `green_context` / `mps` (CUDA): SM shares (`sm_share.py`): a green context of x% of the SMs per worker,
  switched in-process at an iteration boundary; or MPS clients capped by CUDA_MPS_ACTIVE_THREAD_PERCENTAGE when
  they start (a switch: a standby with the new percentage takes over). `auto` on a GPU picks green contexts where torch has them, else MPS where its daemon runs, else
  refuses with both reasons (`engine.partition_backend=none` runs uncapped). A backend asked for by name that
  cannot run logs why and falls back to uncapped (`none`).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from semipd_engine.registry import Registry

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Partition:
    prefill_share: int
    decode_share: int

    def __post_init__(self) -> None:
        for name in ("prefill_share", "decode_share"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or not 1 <= v <= 100:
                raise ValueError(f"{name} must be an integer percentage in [1, 100], got {v!r}")


def machine_cores() -> tuple[int, ...]:
    return tuple(sorted(os.sched_getaffinity(0)))


def unit_cores(n: int, cores: Sequence[int]) -> list[tuple[int, ...]]:
    """The cores of each of a topology's `n` units: disjoint sets from the front; shared round-robin if there
    are fewer cores than units."""
    cores = tuple(cores)
    if len(cores) < n:
        return [(cores[i % len(cores)],) for i in range(n)]
    per = len(cores) // n
    return [tuple(cores[i * per : (i + 1) * per]) for i in range(n)]


def core_sets(p: Partition, cores: Sequence[int]) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """(prefill cores, decode cores) for partition `p` over `cores`."""
    n = len(cores)
    n_prefill = min(n, max(1, round(p.prefill_share / 100 * n)))
    n_decode = min(n, max(1, round(p.decode_share / 100 * n)))
    return tuple(cores[:n_prefill]), tuple(cores[n - n_decode :])


def thread_counts(p: Partition, cores: Sequence[int]) -> tuple[int, int]:
    """(prefill threads, decode threads) for partition `p` over `cores`: never more threads than cores."""
    pre, dec = core_sets(p, cores)
    union = len(set(pre) | set(dec))
    if len(pre) + len(dec) <= union:  # disjoint: one thread per core
        return len(pre), len(dec)
    scale = union / (len(pre) + len(dec))
    tp, td = max(1, round(len(pre) * scale)), max(1, round(len(dec) * scale))
    while tp + td > max(union, 2):  # rounding: take from the larger
        if tp >= td:
            tp -= 1
        else:
            td -= 1
    return tp, td


def pinned_sets(p: Partition, cores: Sequence[int]) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """The core sets the workers run on: their caps (`core_sets`), or where the caps overlap, the cores of
    both divided as `thread_counts` says, prefill from the front and decode from the back."""
    pre, dec = core_sets(p, cores)
    union = sorted(set(pre) | set(dec))
    if len(pre) + len(dec) <= len(union):
        return pre, dec
    tp, td = thread_counts(p, cores)
    if tp + td > len(union):  # one core: nothing to divide
        return pre, dec
    return tuple(union[:tp]), tuple(union[len(union) - td :])


def placement(p: Partition, cores: Sequence[int]) -> tuple:
    """Everything the CPU workers run with under `p`: pinned core sets and thread counts. Two partitions with the
    same placement run identically, so a controller step between them changes nothing."""
    return pinned_sets(p, cores), thread_counts(p, cores)


def _cpu_affinity(device: str) -> str | None:
    return None if device == "cpu" else "core sets cap CPU workers only"


def _cpu_quota(device: str) -> str | None:
    if device != "cpu":
        return "CPU-time quotas cap CPU workers only"
    from semipd_engine.shares.cpu_quota import CpuQuota

    return CpuQuota.open()[1] or None


def _green_context(device: str) -> str | None:
    from semipd_engine.shares.sm_share import green_context_available  # torch, imported only when asked

    return green_context_available(device)


def _mps(device: str) -> str | None:
    from semipd_engine.shares.sm_share import mps_available

    return mps_available(device)


GPU_BACKENDS = ("green_context", "mps")
# name -> why it cannot run on `device` (None: it can)
PARTITION_BACKENDS: Registry[Callable[[str], str | None]] = Registry("partition backend", "engine.partition_backend")
PARTITION_BACKENDS.register("cpu_affinity", _cpu_affinity)
PARTITION_BACKENDS.register("cpu_quota", _cpu_quota)
PARTITION_BACKENDS.register("green_context", _green_context)
PARTITION_BACKENDS.register("mps", _mps)
PARTITION_BACKENDS.register("none", lambda device: None)


def resolve_backend(name: str, device: str) -> str:
    """The backend that will run: `auto` picks per device; an unavailable one falls back to uncapped."""
    if name == "auto" and device == "cpu":
        why = _cpu_quota(device)
        if why is None:
            return "cpu_quota"
        log.warning("partition backend cpu_quota unavailable (%s): shares are core sets (cpu_affinity)", why)
        return "cpu_affinity"
    if name == "auto":
        reasons = {}
        for candidate in GPU_BACKENDS:
            reasons[candidate] = PARTITION_BACKENDS.get(candidate)(device)
            if reasons[candidate] is None:
                return candidate
        raise ValueError("engine.partition_backend=auto on " + device + ": no SM-share backend can run ("
                         + "; ".join(f"{k}: {v}" for k, v in reasons.items())
                         + "); engine.partition_backend=none runs the workers uncapped")
    why = PARTITION_BACKENDS.get(name)(device)
    if why is not None:
        log.warning("partition backend %s unavailable (%s): running uncapped (100, 100)", name, why)
        return "none"
    return name


def apply_share(backend: str, cores: tuple[int, ...], num_threads: int = 0) -> tuple[int, ...]:
    """Pin the calling process to `cores` (cpu_affinity) and size its thread pool."""
    if backend == "cpu_affinity":
        os.sched_setaffinity(0, cores)
    import torch

    allowed = tuple(sorted(os.sched_getaffinity(0)))
    torch.set_num_threads(num_threads or len(allowed))
    return allowed
