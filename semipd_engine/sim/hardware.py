"""GPU presets: spec-sheet peaks, plus efficiencies fitted to public measured kernel latencies.

Spec numbers are the vendor's (dense bf16 tensor-core FLOP/s, HBM bandwidth, NVLink bandwidth per direction).
Every efficiency is a fraction of those peaks, read from ``calibration/gpu.json`` (written by
``calibration/derive.py``), so a preset with a different HBM size or bandwidth on the same silicon reuses the
fractions measured on its sibling: a100-40g uses the A100-SXM4-80GB fits, and h800 (no measured data
published) uses the H100-SXM fits against its own, slower NVLink.
"""

from __future__ import annotations

import json
import math
from bisect import bisect_right
from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

GiB = 1 << 30
CALIBRATION_PATH = Path(__file__).with_name("calibration") / "gpu.json"


@dataclass(frozen=True)
class Curve:
    """A positive quantity of a positive size, interpolated as a power law between breakpoints.

    Power-law (log-log) pieces keep "time = work / (peak * curve(work))" monotone whenever consecutive
    breakpoints rise no faster than the work does, which derive.py enforces; beyond the ends it is flat.
    """

    xs: tuple[float, ...]
    ys: tuple[float, ...]

    def __post_init__(self):
        if not self.xs or len(self.xs) != len(self.ys):
            raise ValueError("a curve needs as many ys as xs, at least one")
        if any(b <= a for a, b in zip(self.xs, self.xs[1:])) or min(self.xs) <= 0 or min(self.ys) <= 0:
            raise ValueError(f"curve breakpoints must be positive and strictly increasing: {self.xs}, {self.ys}")
        # Each piece's log-width and rise, computed once (the simulator evaluates curves ~10^5 times a run)
        object.__setattr__(self, "_pieces", tuple((math.log(b / a), d / c) for a, b, c, d in
                                                  zip(self.xs, self.xs[1:], self.ys, self.ys[1:])))

    def __call__(self, x: float) -> float:
        xs, ys = self.xs, self.ys
        if x <= xs[0]:
            return ys[0]
        if x >= xs[-1]:
            return ys[-1]
        i = bisect_right(xs, x) - 1
        width, rise = self._pieces[i]
        return ys[i] * rise ** (math.log(x / xs[i]) / width)

    def many(self, xs: Sequence[float]) -> list[float]:
        """`[self(x) for x in xs]`, to the bit, without a bisection per value where consecutive values stay in
        one piece (a fast-forward's contexts grow step by step)."""
        bx, ys, pieces, log = self.xs, self.ys, self._pieces, math.log
        lo, hi, i = bx[0], bx[-1], -1
        a = b = 0.0  # the current piece's ends (i >= 0)
        out = []
        for x in xs:
            if x <= lo:
                out.append(ys[0])
            elif x >= hi:
                out.append(ys[-1])
            else:
                if i < 0 or not a <= x < b:
                    i = bisect_right(bx, x) - 1
                    a, b = bx[i], bx[i + 1]
                    width, rise = pieces[i]
                    y = ys[i]
                out.append(y * rise ** (log(x / a) / width))
        return out

    @classmethod
    def from_json(cls, d: dict) -> Curve:
        return cls(tuple(float(x) for x in d["x"]), tuple(float(y) for y in d["y"]))

    @classmethod
    def constant(cls, y: float) -> Curve:
        return cls((1.0,), (float(y),))


@dataclass(frozen=True)
class AllReduceFit:
    tp: int
    latency_s: float  # per call, small messages (custom all-reduce under a CUDA graph)
    bw_eff: Curve  # achieved ring bus bandwidth / link_bw, by message bytes


@dataclass(frozen=True)
class Hardware:
    name: str
    peak_flops: float  # dense bf16/fp16 tensor-core FLOP/s
    mem_bw: float  # HBM bytes/s
    mem_bytes: int
    num_sms: int
    link_bw: float  # NVLink bytes/s per direction
    link_latency_s: float  # per collective call (smallest-message all-reduce at tp=2)
    calibrated_on: str  # the measured system the efficiencies come from
    gemm_compute_eff: Curve  # fraction of peak_flops by GEMM rows m
    gemm_bw_eff: Curve  # fraction of mem_bw by bytes moved, for memory-bound (small-m) GEMMs
    gemm_floor_s: float
    prefill_attn_eff: Curve  # fraction of peak_flops by equivalent prompt length (2 * pairs / tokens - 1)
    prefill_attn_floor_s: float
    decode_attn_bw_eff: Curve  # fraction of mem_bw by KV bytes read
    decode_attn_cta_s: float  # per (sequence x KV head): the kernel's fixed work per thread block
    decode_attn_floor_s: float
    elementwise_bw_eff: float
    elementwise_floor_s: float
    allreduce: tuple[AllReduceFit, ...] = ()

    def allreduce_fit(self, tp: int) -> AllReduceFit | None:
        """The fit measured at ``tp`` ranks, else at the nearest measured count."""
        if not self.allreduce:
            return None
        return min(self.allreduce, key=lambda f: (abs(math.log(f.tp / tp)), f.tp))

    @classmethod
    def from_calibration(cls, name: str, spec: dict, entry: dict, calibrated_on: str) -> Hardware:
        """From one ``systems`` entry of the calibration file and a ``SPECS``-style dict of spec numbers."""
        g, pa, da, ew = entry["gemm"], entry["prefill_attn"], entry["decode_attn"], entry["elementwise"]
        per_tp = sorted(entry["allreduce"].get("tp", {}).items(), key=lambda kv: int(kv[0]))
        fits = tuple(AllReduceFit(int(tp), float(v["latency_s"]), Curve.from_json(v["bw_eff"])) for tp, v in per_tp)
        return cls(
            name=name,
            peak_flops=spec["peak_flops"],
            mem_bw=spec["mem_bw"],
            mem_bytes=spec["mem_bytes"],
            num_sms=spec["num_sms"],
            link_bw=spec["link_bw"],
            link_latency_s=fits[0].latency_s if fits else 5e-6,
            calibrated_on=calibrated_on,
            gemm_compute_eff=Curve.from_json(g["compute_eff"]),
            gemm_bw_eff=Curve.from_json(g["bw_eff"]),
            gemm_floor_s=float(g["floor_s"]),
            prefill_attn_eff=Curve.from_json(pa["compute_eff"]),
            prefill_attn_floor_s=float(pa["floor_s"]),
            decode_attn_bw_eff=Curve.from_json(da["bw_eff"]),
            decode_attn_cta_s=float(da["per_cta_s"]),
            decode_attn_floor_s=float(da["floor_s"]),
            elementwise_bw_eff=float(ew["bw_eff"]),
            elementwise_floor_s=float(ew["floor_s"]),
            allreduce=fits,
        )

    @classmethod
    def preset(cls, name: str, calibration: dict | None = None) -> Hardware:
        if name not in SPECS:
            raise ValueError(f"hardware.name={name!r} is not a known GPU; valid: {hardware_names()}")
        spec = SPECS[name]
        cal = calibration if calibration is not None else load_calibration()
        key = spec["calibration"]
        if key not in cal.get("systems", {}):
            raise ValueError(f"hardware.name={name!r}: no calibration for {key!r} in the calibration file")
        return cls.from_calibration(name, spec, cal["systems"][key], key)


def hardware_names() -> list[str]:
    return sorted(SPECS)


@lru_cache(maxsize=4)
def _read(path: str) -> dict:
    return json.loads(Path(path).read_text())


def load_calibration(path: str | Path | None = None) -> dict:
    return _read(str(path or CALIBRATION_PATH))


# Spec sheets (SXM parts). Memory sizes are the marketed GB read as GiB, about as the driver reports them
# (an A100 80GB shows 81920 MiB). NVLink is the marketed total halved: per direction.
SPECS: dict[str, dict] = {
    "a100-40g": dict(peak_flops=312e12, mem_bw=1.555e12, mem_bytes=40 * GiB, num_sms=108, link_bw=300e9,
                     calibration="a100_sxm"),
    "a100-80g": dict(peak_flops=312e12, mem_bw=2.039e12, mem_bytes=80 * GiB, num_sms=108, link_bw=300e9,
                     calibration="a100_sxm"),
    "h100": dict(peak_flops=989e12, mem_bw=3.35e12, mem_bytes=80 * GiB, num_sms=132, link_bw=450e9,
                 calibration="h100_sxm"),
    "h200": dict(peak_flops=989e12, mem_bw=4.8e12, mem_bytes=141 * GiB, num_sms=132, link_bw=450e9,
                 calibration="h200_sxm"),
    # No measured H800 tables are published: same Hopper die as H100 SXM, so its efficiencies are H100's.
    "h800": dict(peak_flops=989e12, mem_bw=3.35e12, mem_bytes=80 * GiB, num_sms=132, link_bw=200e9,
                 calibration="h100_sxm"),
}
