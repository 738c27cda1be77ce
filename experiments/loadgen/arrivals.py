"""Arrival schedules, computed whole before the run as offsets from its start.

Dispatching against absolute times (start + offset) means a late request never
delays the ones after it: no accumulated drift.
"""

from __future__ import annotations

from typing import Optional

import numpy as np
from scipy import stats

ARRIVALS = ("poisson", "gamma", "constant", "trace", "closed")


def schedule(cfg, n: int, trace_times: Optional[list[float]] = None) -> Optional[np.ndarray]:
    """Offsets in seconds, or None for a closed loop (a request leaves when a slot frees)."""
    kind = cfg.arrival
    if kind not in ARRIVALS:
        raise ValueError(f"workload.arrival must be one of {ARRIVALS}, got {kind!r}")
    if kind == "closed":
        if cfg.max_concurrency <= 0:
            raise ValueError("workload.arrival=closed needs workload.max_concurrency > 0")
        return None
    if kind == "trace":
        if trace_times is None:
            raise ValueError(f"workload {cfg.name!r} has no timestamps; use arrival=poisson|gamma|constant")
        return np.asarray(trace_times, dtype=float) - trace_times[0]
    if cfg.rate <= 0:
        raise ValueError(f"workload.rate must be > 0, got {cfg.rate}")
    rng = np.random.default_rng(cfg.seed + 7919)
    if kind == "constant":
        gaps = np.full(n, 1.0 / cfg.rate)
    else:
        dist = interarrival_distribution(cfg)
        gaps = dist.rvs(size=n, random_state=rng)
    gaps[0] = 0.0
    return np.cumsum(gaps)


def interarrival_distribution(cfg):
    """The scipy distribution the inter-arrival times should follow (for the KS self-check)."""
    if cfg.arrival == "poisson":
        return stats.expon(scale=1.0 / cfg.rate)
    if cfg.arrival == "gamma":
        if cfg.burstiness <= 0:
            raise ValueError("workload.burstiness must be > 0")
        return stats.gamma(a=cfg.burstiness, scale=1.0 / (cfg.rate * cfg.burstiness))
    return None
