"""`model.dtype=auto`: the half-precision dtype where the device multiplies it natively, else float32.

Many CPUs have no bfloat16 units: there torch emulates bf16 matmuls at ~1% of float32's speed (measured on an
AVX2-only EPYC: 0.9 vs 103 GFLOP/s), so a bf16 default that is 4x faster on a CPU with avx512_bf16 is >100x
slower on one without. Flags in /proc/cpuinfo do not settle it (oneDNN's dispatch, ONEDNN_MAX_CPU_ISA and the
torch build decide), so the choice is *measured*: one short matmul per dtype, once per machine, torch version
and kernel-dispatch setting, cached beside the other calibrations (~/.cache/semipd_engine/dtype_probe.json).
On CUDA, bfloat16 where the device supports it, else float16.

`SEMIPD_AUTO_DTYPE=<dtype>` pins what `auto` means without measuring (the test suite pins float32, so its
greedy comparisons are the same on every machine); a dtype forced by name is used as given, with a warning when
the probe says this CPU emulates it.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import platform
import time
from pathlib import Path
from typing import Any, Optional

from semipd_engine import cache

log = logging.getLogger(__name__)

AUTO = "auto"
NAMES = ("float32", "bfloat16", "float16")
# A native bf16/fp16 unit does two half-precision products per float32 lane (and more on AMX): its matmul is
# at least float32's speed. Emulation runs at a few percent of it. The line between the two is 1x.
NATIVE_RATIO = 1.0
PROBE_N = 512  # a 512^3 matmul: ~0.3 ms where native, ~0.1 s where emulated
PROBE_BUDGET_S = 0.05
# Environment that changes which kernels torch dispatches to, hence what the probe would measure.
DISPATCH_ENV = ("ONEDNN_MAX_CPU_ISA", "DNNL_MAX_CPU_ISA", "ATEN_CPU_CAPABILITY")
PIN_ENV = "SEMIPD_AUTO_DTYPE"


@dataclasses.dataclass(frozen=True)
class DtypeChoice:
    """What `model.dtype` resolved to on this device, and the measurement behind it."""

    dtype: str  # the concrete dtype the model runs in
    requested: str  # auto, or the dtype given by name
    device: str
    reason: str
    gflops: dict[str, float] = dataclasses.field(default_factory=dict)  # matmul GFLOP/s per dtype (CPU)
    capability: Optional[str] = None  # torch's CPU kernel level (AVX2, AVX512, ...)
    cpu_flags: tuple[str, ...] = ()  # half-precision flags in /proc/cpuinfo (informative only)
    threads: Optional[int] = None
    cached: bool = False
    emulated: bool = False  # a dtype forced by name that this CPU emulates

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def cache_path() -> Path:
    return cache.cache_dir() / "dtype_probe.json"


def _cpuinfo(field: str) -> str:
    """The first `field` line of /proc/cpuinfo ('' where there is none)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(field):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return ""


def _cpu_model() -> str:
    return _cpuinfo("model name") or platform.processor() or platform.machine()


def _half_flags() -> tuple[str, ...]:
    return tuple(sorted(f for f in _cpuinfo("flags").split() if "bf16" in f or "fp16" in f or f.startswith("amx")))


def probe_key() -> str:
    import torch

    env = ",".join(f"{k}={os.environ[k]}" for k in DISPATCH_ENV if os.environ.get(k))
    return f"{_cpu_model()}|{torch.backends.cpu.get_cpu_capability()}|torch {torch.__version__}|{env}"


def matmul_gflops(dtype_name: str, n: int = PROBE_N, budget_s: float = PROBE_BUDGET_S) -> float:
    """GFLOP/s of an n x n x n matmul in `dtype_name` on the CPU with torch's current threads."""
    import torch

    dt = getattr(torch, dtype_name)
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(n, n, generator=g).to(dt), torch.randn(n, n, generator=g).to(dt)
    t0 = time.perf_counter()
    a @ b  # warm-up, and a first estimate of one product's time
    first = time.perf_counter() - t0
    reps = max(2, min(200, int(budget_s / max(first, 1e-6))))
    t0 = time.perf_counter()
    for _ in range(reps):
        a @ b
    return 2.0 * n ** 3 * reps / (time.perf_counter() - t0) / 1e9


def cpu_probe(refresh: bool = False) -> dict[str, Any]:
    """Matmul GFLOP/s of float32, bfloat16 and float16 on this CPU: measured once, then read from the cache."""
    import torch

    path, key = cache_path(), probe_key()
    hit = cache.read(path).get(key)
    if hit and not refresh:
        return {**hit, "cached": True}
    entry = {"gflops": {name: round(matmul_gflops(name), 2) for name in NAMES},
             "capability": torch.backends.cpu.get_cpu_capability(), "threads": torch.get_num_threads(),
             "measured_at": time.time()}
    try:
        cache.update(path, key, entry)
    except OSError as e:
        log.warning("could not cache the dtype probe in %s: %s", path, e)
    return {**entry, "cached": False}


def _ratio(gflops: dict[str, float], name: str) -> float:
    return gflops[name] / max(gflops["float32"], 1e-9)


def choose(requested: str = AUTO, device: str = "cpu") -> DtypeChoice:
    """Resolve `model.dtype` for `device`; `auto` picks, a dtype by name is kept (and checked on a CPU)."""
    if requested != AUTO and requested not in NAMES:
        raise ValueError(f"model.dtype must be auto or one of {list(NAMES)}, got {requested!r}")
    if device.startswith("cuda"):
        return _choose_cuda(requested, device)
    pinned = os.environ.get(PIN_ENV)
    if requested == AUTO and pinned:
        if pinned not in NAMES:
            raise ValueError(f"{PIN_ENV} must be one of {list(NAMES)}, got {pinned!r}")
        return DtypeChoice(pinned, AUTO, device, f"{PIN_ENV}={pinned} (not measured)")
    if requested == "float32":  # nothing to check: every CPU multiplies float32 natively
        return DtypeChoice("float32", requested, device, "given by name")
    p = cpu_probe()
    g = p["gflops"]
    common = dict(device=device, gflops=g, capability=p["capability"], cpu_flags=_half_flags(),
                  threads=p["threads"], cached=p["cached"])
    if requested == AUTO:
        r = _ratio(g, "bfloat16")
        if r >= NATIVE_RATIO:
            why = f"bfloat16 matmuls are native here: {g['bfloat16']:.0f} vs {g['float32']:.0f} GFLOP/s float32 ({r:.1f}x)"
            return DtypeChoice("bfloat16", AUTO, reason=why, **common)
        why = (f"bfloat16 is emulated on this CPU: {g['bfloat16']:.1f} vs {g['float32']:.0f} GFLOP/s float32 "
               f"({r:.3f}x), so float32")
        return DtypeChoice("float32", AUTO, reason=why, **common)
    r = _ratio(g, requested)
    if r < NATIVE_RATIO:
        log.warning("model.dtype=%s is emulated on this CPU (%s): its matmuls run at %.1f GFLOP/s against %.0f in "
                    "float32 (%.3fx); every forward pass will be about that much slower. model.dtype=auto picks "
                    "float32 here.", requested, p["capability"], g[requested], g["float32"], r)
        return DtypeChoice(requested, requested, reason=f"given by name; emulated here ({r:.3f}x float32)",
                           emulated=True, **common)
    return DtypeChoice(requested, requested, reason=f"given by name; native here ({r:.1f}x float32)", **common)


def _choose_cuda(requested: str, device: str) -> DtypeChoice:
    import torch

    if requested != AUTO:
        return DtypeChoice(requested, requested, device, "given by name")
    if torch.cuda.is_available() and torch.cuda.is_bf16_supported():
        return DtypeChoice("bfloat16", AUTO, device, "the GPU supports bfloat16")
    return DtypeChoice("float16", AUTO, device, "the GPU does not support bfloat16: float16")


def resolve(model_cfg) -> tuple[Any, DtypeChoice]:
    """`model_cfg` with a concrete dtype (resolved once, before workers start), and the choice behind it."""
    choice = choose(model_cfg.dtype, model_cfg.device)
    if choice.dtype != model_cfg.dtype:
        model_cfg = dataclasses.replace(model_cfg, dtype=choice.dtype)
    return model_cfg, choice


def describe(choice: DtypeChoice) -> str:
    return f"model.dtype={choice.requested} -> {choice.dtype} on {choice.device}: {choice.reason}" + (
        " (probe cached)" if choice.cached else "")
