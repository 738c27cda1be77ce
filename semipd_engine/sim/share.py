"""How an iteration slows down on a fraction of the GPU: semi-PD's SM partition as a cost multiplier.

Measured slowdowns under MPS / green-context SM caps follow time(f) = a/f + b with f the share in (0, 1]:
the 1/f part scales with SMs, the constant part (HBM-bound work, launch latency) does not. Factors are
normalised by a + b so that 100 % is exactly the cost model's own time; the published fits give a + b = 0.98,
within their measurement noise.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class ShareModel:
    a: float
    b: float

    def __post_init__(self):
        if self.a + self.b <= 0:
            raise ValueError(f"share model needs a + b > 0, got a={self.a}, b={self.b}")

    def factor(self, share_pct: float) -> float:
        """Time at ``share_pct`` percent of the device over time at 100 %."""
        if not 0 < share_pct <= 100:
            raise ValueError(f"compute share must be in (0, 100] percent, got {share_pct}")
        return (self.a * 100.0 / share_pct + self.b) / (self.a + self.b)

    @classmethod
    def fit(cls, shares: Sequence[float], times: Sequence[float]) -> ShareModel:
        """Least squares of times on 1/f (shares in percent), normalised so a + b = 1."""
        if len(shares) != len(times) or len({float(s) for s in shares}) < 2:
            raise ValueError("fitting a share model needs times at two or more distinct shares")
        xs = [100.0 / s for s in shares]
        mx, my = sum(xs) / len(xs), sum(times) / len(times)
        sxx = sum((x - mx) ** 2 for x in xs)
        a = sum((x - mx) * (y - my) for x, y in zip(xs, times)) / sxx
        b = my - a * mx
        if a + b <= 0:
            raise ValueError(f"share fit has no positive full-share time (a={a}, b={b})")
        return cls(a / (a + b), b / (a + b))


# Fits of MuxServe's MPS measurements on A100 (arXiv 2404.02015): decode and prefill latency vs SM fraction.
MUXSERVE_DECODE_A100 = ShareModel(0.41, 0.57)
MUXSERVE_PREFILL_A100 = ShareModel(0.70, 0.28)
# semi-PD's own fit of TPOT against the decode share (arXiv 2504.19867): the same shape, for comparison.
SEMIPD_DECODE = ShareModel(0.6284, 0.3818)
# While the other phase runs, a phase's HBM-bound time stretches by this much. Both phases draw on one HBM
# (Nexus, arXiv 2507.06608, finds bandwidth contention the main cross-phase cost; a memory-bound GEMM already
# saturates HBM at ~35% of the SMs on H100 PCIe per BulletServe), so a share cap alone understates it. 1.2
# is an assumption chosen to err against co-location, not a measurement; 1.0 switches contention off.
DEFAULT_CONTENTION = 1.2


@dataclass(frozen=True)
class ShareModels:
    prefill: ShareModel = MUXSERVE_PREFILL_A100
    decode: ShareModel = MUXSERVE_DECODE_A100
    contention: float = DEFAULT_CONTENTION

    def __post_init__(self):
        if self.contention < 1.0:
            raise ValueError(f"contention is a slowdown multiplier >= 1, got {self.contention}")

    def time(self, phase: str, full_share_s: float, share_pct: float, memory_bound_s: float = 0.0,
             other_running: bool = False) -> float:
        """Seconds of an iteration that takes ``full_share_s`` alone on the whole GPU.

        ``memory_bound_s`` is the HBM-bound part of it (RooflineCostModel.memory_bound_time); it is stretched
        by ``contention`` only while the other phase's worker is running at the same time.
        """
        model = self.prefill if phase == "prefill" else self.decode if phase == "decode" else None
        if model is None:
            raise ValueError(f"phase must be 'prefill' or 'decode', got {phase!r}")
        t = full_share_s + (self.contention - 1.0) * memory_bound_s if other_running else full_share_s
        return t * model.factor(share_pct)
