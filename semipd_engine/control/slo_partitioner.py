"""SLO-aware dynamic partitioning: the semi-PD paper's Algorithm 1 with latency models fitted online.

Latency models (the paper's, with x and y the prefill and decode shares in %):
    TTFT(x) = a1 / (x - lam) + b1,  lam = 100 * r * l_100   (an M/M/1 queue in front of prefill;
                                                          r = arrival rate, l_100 = prefill time per
                                                          request at full share)
    TPOT(y) = a2 / y + b2                                   (no queueing)
Both are linear in (a, b) once the feature 1/(x - lam) or 1/y is known, so each
refit is an ordinary least-squares solve over the windows observed so far, at
the shares actually run. Until two distinct feature values exist the prior is
pure inverse scaling through the latest observation (b = 0, a = latency x
feature^-1), i.e. "latency is proportional to 1/share", the paper's l_x = (100/x) l_100.

Algorithm 1, every window: observe the percentile TTFT and TPOT of the requests
that finished in it. Exactly one fails -> raise that phase's share in steps of
`step_size` until the model predicts the SLO is met or `max_step` steps are
taken; a raise past `max_share` lowers the other share instead. Both pass or
both fail -> keep. Steps that the backend cannot distinguish (on 2 CPU cores
only a handful of partitions differ) are skipped, not counted.

An optional third rule (`futile_cap_windows`), for devices where a share stops buying speed (measured on two CPU
cores under CPU-time quotas: decode is no faster above one core's worth while prefill runs, so TPOT(y) = a2/y + b2
promises gains the hardware does not give, and the loop kept raising decode, taking prefill's share until TTFT
failed): a raise whose next window shows less than `futile_fraction` of the improvement the model predicted is
undone (the other phase gets its share back) and the phase is capped at its old share for `futile_cap_windows`
windows.

Two rules the paper's text leaves implicit, without which the loop oscillates
(found replaying the paper preset's decision log: from (100, 100) with TPOT
failing it cut prefill to 70, 40, 10, then TTFT failed and it swung back):
- the models' features are the *effective* shares: caps that add past 100 % (the
  paper's MPS percentages may) split the device in proportion while both phases
  run, so lowering prefill from (100, 100) does give decode more, and the TPOT
  model can predict when that is enough;
- a step is never taken into a partition where the other phase's model predicts
  its SLO fails: the phase that passes now keeps passing.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Optional

import numpy as np

from semipd_engine.shares.partition import Partition


@dataclass(frozen=True)
class ControllerConfig:
    ttft_slo_s: float
    tpot_slo_s: float
    percentile: float = 90.0
    step_size: int = 10
    max_step: int = 3
    min_share: int = 10
    max_share: int = 100
    min_requests: int = 5  # fewer finished requests in a window: no decision
    # Revert a raise that did not pay (see `SLOPartitioner._futile`) and cap that phase at its old share for this
    # many windows; 0: never (Algorithm 1 as published).
    futile_cap_windows: int = 0
    futile_fraction: float = 0.25  # a raise pays when at least this fraction of the gain its model predicted shows


class InverseModel:
    """latency = a * feature + b, fitted by least squares on (feature, latency) samples."""

    def __init__(self, max_samples: int = 64):
        self.samples: list[tuple[float, float]] = []
        self.max_samples = max_samples
        self.a: Optional[float] = None
        self.b: float = 0.0

    def add(self, feature: float, latency: float) -> None:
        if not (math.isfinite(feature) and math.isfinite(latency)) or feature <= 0:
            return
        self.samples.append((feature, latency))
        self.samples = self.samples[-self.max_samples :]
        self.fit()

    def fit(self) -> None:
        f = np.array([s[0] for s in self.samples])
        y = np.array([s[1] for s in self.samples])
        if len(np.unique(np.round(f, 9))) >= 2:
            a, b = np.linalg.lstsq(np.stack([f, np.ones_like(f)], axis=1), y, rcond=None)[0]
            if a > 0:  # a non-physical fit (latency falling with less compute) keeps the prior
                self.a, self.b = float(a), float(b)
                return
        last_f, last_y = self.samples[-1]
        self.a, self.b = last_y / last_f, 0.0  # prior: pure inverse scaling through the last point

    @property
    def fitted(self) -> bool:
        return self.a is not None

    def predict(self, feature: float) -> float:
        if self.a is None:
            return math.nan
        if feature <= 0 or not math.isfinite(feature):
            return math.inf
        return self.a * feature + self.b


@dataclass
class Window:
    """What the engine saw during one control window."""

    duration_s: float
    ttfts: list[float]
    tpots: list[float]
    arrivals: int
    prefill_busy_s: float = 0.0  # prefill iteration time in the window
    prefilled_requests: int = 0


@dataclass
class Decision:
    time_s: float
    old: Partition
    new: Partition
    reason: str
    observed_ttft_s: float
    observed_tpot_s: float
    predicted_ttft_s: float
    predicted_tpot_s: float
    rate: float
    lam: float
    coefficients: dict[str, Optional[float]] = field(default_factory=dict)

    def row(self) -> dict:
        return {"time_s": self.time_s, "prefill_share": self.new.prefill_share,
                "decode_share": self.new.decode_share, "old_prefill_share": self.old.prefill_share,
                "old_decode_share": self.old.decode_share, "reason": self.reason,
                "observed_ttft_s": self.observed_ttft_s, "observed_tpot_s": self.observed_tpot_s,
                "predicted_ttft_s": self.predicted_ttft_s, "predicted_tpot_s": self.predicted_tpot_s,
                "rate": self.rate, "lambda": self.lam, **self.coefficients}


class SLOPartitioner:
    def __init__(self, cfg: ControllerConfig, distinct: Callable[[Partition, Partition], bool] = lambda a, b: a != b):
        self.cfg = cfg
        self.distinct = distinct  # does the backend run these two partitions differently?
        self.ttft_model = InverseModel()
        self.tpot_model = InverseModel()
        self.l_100: Optional[float] = None  # prefill seconds per request at full share
        # The last window's raise: (phase, partition before it, observed and predicted latency of that phase).
        self._raised: Optional[tuple[str, Partition, float, float, float]] = None
        self.caps: dict[str, tuple[int, int]] = {}  # phase -> (share it may not pass, windows left)

    @staticmethod
    def effective(p: Partition) -> tuple[float, float]:
        """The shares each phase gets while both run: caps past 100 % in total split the device pro rata."""
        x, y = p.prefill_share, p.decode_share
        return (x * 100.0 / (x + y), y * 100.0 / (x + y)) if x + y > 100 else (float(x), float(y))

    def predict(self, p: Partition, lam: float) -> tuple[float, float]:
        """The models' (TTFT, TPOT) at partition `p` (nan: not fitted yet)."""
        x, y = self.effective(p)
        return self.ttft_model.predict(self.ttft_feature(x, lam)), self.tpot_model.predict(1.0 / y)

    @staticmethod
    def lam(rate: float, l_100: Optional[float]) -> float:
        return 100.0 * rate * (l_100 or 0.0)

    def ttft_feature(self, x: float, lam: float) -> float:
        return 1.0 / (x - lam) if x > lam else math.inf

    def observe(self, w: Window, p: Partition) -> tuple[float, float, float, float]:
        """Update the models with one window; returns (observed ttft, observed tpot, rate, lambda)."""
        rate = w.arrivals / w.duration_s if w.duration_s > 0 else 0.0
        x, y = self.effective(p)
        if w.prefilled_requests:
            l_x = w.prefill_busy_s / w.prefilled_requests
            self.l_100 = l_x * x / 100.0  # l_x = (100 / x) * l_100
        lam = self.lam(rate, self.l_100)
        q = self.cfg.percentile
        ttft = float(np.percentile(w.ttfts, q)) if w.ttfts else math.nan
        tpot = float(np.percentile(w.tpots, q)) if w.tpots else math.nan
        if w.ttfts:
            self.ttft_model.add(self.ttft_feature(x, lam), ttft)
        if w.tpots:
            self.tpot_model.add(1.0 / y, tpot)
        return ttft, tpot, rate, lam

    def coefficients(self) -> dict[str, Optional[float]]:
        return {"a1": self.ttft_model.a, "b1": self.ttft_model.b, "a2": self.tpot_model.a,
                "b2": self.tpot_model.b, "l_100": self.l_100}

    def step(self, now: float, w: Window, p: Partition) -> Decision:
        """One control window: observe, then decide the next partition."""
        ttft, tpot, rate, lam = self.observe(w, p)
        c = self.cfg
        reason, new = "keep", p
        raised, self._raised = self._raised, None
        self.caps = {ph: (cap, left - 1) for ph, (cap, left) in self.caps.items() if left > 1}
        futile = None
        if len(w.ttfts) < c.min_requests:
            self._raised = raised  # judged by the next window that says something
        else:
            futile = self._futile(raised, p, ttft, tpot)
        if futile is not None:
            new, reason = futile
        elif len(w.ttfts) < c.min_requests:
            reason = "too few requests"
        else:
            ttft_fail, tpot_fail = ttft > c.ttft_slo_s, (tpot > c.tpot_slo_s if w.tpots else False)
            if ttft_fail and tpot_fail:
                reason = "both fail: keep"
            elif not ttft_fail and not tpot_fail:
                reason = "both pass: keep"
            else:
                phase = "prefill" if ttft_fail else "decode"
                new, why = self._raise(p, phase, lam)
                reason = f"{'ttft' if ttft_fail else 'tpot'} fails: " + (f"more {phase}" if new != p else why)
                if new != p and c.futile_cap_windows:
                    observed, (pred_now, pred_new) = (ttft if ttft_fail else tpot), (
                        self._phase_prediction(p, phase, lam), self._phase_prediction(new, phase, lam))
                    self._raised = (phase, p, observed, pred_now, pred_new)
        pred_ttft, pred_tpot = self.predict(new, lam)
        return Decision(now, p, new, reason, ttft, tpot, pred_ttft, pred_tpot, rate, lam, self.coefficients())

    def _phase_prediction(self, p: Partition, phase: str, lam: float) -> float:
        return self.predict(p, lam)[0 if phase == "prefill" else 1]

    def _futile(self, raised, p: Partition, ttft: float, tpot: float) -> Optional[tuple[Partition, str]]:
        """After a raise: did the raised phase's latency fall by at least `futile_fraction` of what its model
        predicted? If not, the partition before the raise and the phase capped at its share there."""
        if raised is None:
            return None
        phase, before, observed_before, pred_before, pred_after = raised
        now = ttft if phase == "prefill" else tpot
        if not all(math.isfinite(v) for v in (now, observed_before, pred_before, pred_after)) or pred_before <= 0:
            return None
        promised = 1.0 - pred_after / pred_before  # the fall the model predicted, as a fraction
        if promised <= 0 or 1.0 - now / observed_before >= self.cfg.futile_fraction * promised:
            return None
        share = before.prefill_share if phase == "prefill" else before.decode_share
        self.caps[phase] = (share, self.cfg.futile_cap_windows)
        return before, (f"more {phase} did not help ({observed_before * 1e3:.1f} -> {now * 1e3:.1f} ms, "
                        f"{promised:.0%} predicted): back, {phase} capped at {share}")

    def _raise(self, p: Partition, phase: str, lam: float) -> tuple[Partition, str]:
        """The partition to move to, and why it is `p` when it is."""
        c = self.cfg
        best, why = p, "no distinct step left"
        if phase in self.caps:
            why = f"{phase} capped at {self.caps[phase][0]} (more did not help)"
        taken = 0
        k = 0
        while taken < c.max_step:
            k += 1
            cand = self._candidate(p, phase, k * c.step_size)
            if cand is None:
                break
            if not self.distinct(cand, best):
                continue  # the backend runs it exactly like the last one: not a step
            if not self._other_holds(cand, phase, lam):
                why = "the other phase's SLO would fail"
                break
            best = cand
            taken += 1
            if self._meets(cand, phase, lam):
                break
        return best, why

    def _candidate(self, p: Partition, phase: str, delta: int) -> Optional[Partition]:
        """`phase`'s share raised by `delta`; what would pass max_share lowers the other share instead."""
        c = self.cfg
        mine, other = (p.prefill_share, p.decode_share) if phase == "prefill" else (p.decode_share, p.prefill_share)
        if phase in self.caps:  # more did not help: not past its cap, and the other phase is not asked to pay
            cap = self.caps[phase][0]
            if mine >= cap:
                return None
            delta = min(delta, cap - mine)
        excess = max(0, mine + delta - c.max_share)
        mine, other = min(c.max_share, mine + delta), other - excess
        if other < c.min_share:
            return None
        return Partition(mine, other) if phase == "prefill" else Partition(other, mine)

    def _meets(self, p: Partition, phase: str, lam: float) -> bool:
        ttft, tpot = self.predict(p, lam)
        return ttft <= self.cfg.ttft_slo_s if phase == "prefill" else tpot <= self.cfg.tpot_slo_s

    def _other_holds(self, p: Partition, phase: str, lam: float) -> bool:
        """Does the phase not being raised still meet its SLO at `p`, by its model? (No model yet: yes.)"""
        ttft, tpot = self.predict(p, lam)
        pred, slo = (tpot, self.cfg.tpot_slo_s) if phase == "prefill" else (ttft, self.cfg.ttft_slo_s)
        return math.isnan(pred) or pred <= slo
