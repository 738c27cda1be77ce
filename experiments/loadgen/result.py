"""What one load run produced, as one type for both backends and for the goodput search.

A real run (`experiments.loadgen.client.run_loadgen`) and a simulated one (`experiments.sweep.simulated`) build it
through `measured` (the measurement window, the statistics with their intervals, completeness), the sweep adds
what it checked around the run (`host`, `step_probe`, `validity`), and a goodput search returns the result of the
probe it reports with the search attached. Everything a user reads is serialised from it here: summary.json
(`to_dict`, `write`, read back with `load`) and the job's row of summary.csv / points.csv / the W&B tables (`row`).
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import pandas as pd

from experiments.analysis import request_metrics as M

LATENCIES = ("ttft_s", "tpot_s", "e2e_s", "ntpot_s", "ttft_from_send_s", "e2e_from_send_s", "itl_s",
             "dispatch_lateness_s")
QUANTILES = ("mean", "p50", "p90", "p99")
# Headline statistics of a row, each with its 95% interval (`<name>_ci_low`, `<name>_ci_high`) -> key in `ci`.
_CI_KEYS = {"slo_attainment": "slo_attainment", "goodput_rps": "goodput", "request_throughput": "request_throughput",
            "output_token_throughput": "output_token_throughput"}
# Blocks of the aggregates that summary.json keeps at its top level, where a reader looks for them.
_BLOCKS = ("tpot_definitions", "steady_state")
# Optional parts written to summary.json only when present (a simulated run has no host check, a real one no
# simulator counters), as the files always were.
_OPTIONAL = ("signal", "completeness", "context", "backend", "host", "step_probe", "validity", "endpoint")


@dataclass(frozen=True)
class Latency:
    """One latency over the measured requests, in seconds (None: no request finished)."""
    mean: Optional[float] = None
    p50: Optional[float] = None
    p90: Optional[float] = None
    p99: Optional[float] = None


@dataclass(frozen=True)
class Aggregates:
    """The run's statistics over its measured requests; `ci` holds their 95% intervals
    ({"slo_attainment": [lo, hi], "ttft_s.p90": [lo, hi], ...}; experiments/analysis/uncertainty.py)."""
    num_requests: int
    num_ok: int
    num_errors: int
    duration_s: float
    request_throughput: float
    output_token_throughput: float
    total_token_throughput: float
    slo_attainment: float
    goodput: float
    prefix_cache_hit_rate: Optional[float] = None  # cached prompt tokens / prompt tokens (None: not reported)
    ttft_s: Latency = Latency()
    tpot_s: Latency = Latency()
    e2e_s: Latency = Latency()
    ntpot_s: Latency = Latency()
    ttft_from_send_s: Latency = Latency()
    e2e_from_send_s: Latency = Latency()
    itl_s: Latency = Latency()
    dispatch_lateness_s: Latency = Latency()
    ci: dict[str, list[float]] = field(default_factory=dict)
    # The run under every TPOT definition and its stalls (request_metrics.tpot_definitions); {}: an older file.
    tpot_definitions: dict[str, Any] = field(default_factory=dict)
    # First vs second half of the measured window (request_metrics.steady_state); None: an older file.
    steady_state: Optional[dict[str, Any]] = None

    def latency(self, name: str) -> Latency:
        return getattr(self, name)

    @property
    def tpot_definition(self) -> str:
        """The TPOT definition `slo_attainment` and `goodput` were judged under."""
        return self.tpot_definitions.get("chosen", "mean")

    @property
    def reached_steady_state(self) -> Optional[bool]:
        return (self.steady_state or {}).get("steady_state")

    def interval(self, key: str) -> tuple[Optional[float], Optional[float]]:
        lo_hi = self.ci.get(key)
        return (lo_hi[0], lo_hi[1]) if lo_hi else (None, None)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Aggregates:
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: (Latency(**v) if k in LATENCIES else v) for k, v in d.items() if k in names})

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass(frozen=True)
class SLOs:
    ttft_s: float
    tpot_s: float
    tpot_definition: str = "mean"  # how tpot_s is read (experiments/analysis/request_metrics.py)


@dataclass(frozen=True)
class WorkloadRun:
    """The workload as it was replayed: its name, size, arrivals and the lengths actually sent."""
    name: str
    num_requests: int
    arrival: str
    rate: Optional[float]
    num_clipped: int = 0
    lengths: dict[str, Any] = field(default_factory=dict)
    num_conversations: int = 0  # multi-turn: the conversations the requests are turns of (0: independent requests)

    @property
    def length_warnings(self) -> list[str]:
        return list(self.lengths.get("warnings", []))


@dataclass(frozen=True)
class Validity:
    valid: bool
    reasons: tuple[str, ...] = ()


@dataclass(frozen=True)
class GoodputSearch:
    """A bisection on the rate: the goodput, how far to trust it, and every probe's row."""
    goodput_rate: float
    target_attainment: float
    goodput_at_range_top: bool
    goodput_at_range_bottom: bool
    goodput_monotone: bool
    probes: tuple[dict[str, Any], ...] = ()


@dataclass(frozen=True)
class RunResult:
    aggregates: Aggregates
    slo: SLOs
    workload: WorkloadRun
    self_check: dict[str, Any]  # the client's schedule check: `valid`, `reasons` and its figures
    model: Optional[str] = None
    endpoint: Optional[str] = None  # completions | chat (None: simulated)
    base_url: Optional[str] = None
    interrupted: bool = False
    signal: Optional[str] = None
    completeness: Optional[dict[str, Any]] = None
    length_mismatch: dict[str, Any] = field(default_factory=dict)
    # The server's context length and what was done to requests that did not fit it (loadgen.over_context).
    context: Optional[dict[str, Any]] = None
    backend: Optional[dict[str, Any]] = None  # simulated: the simulator's counters
    host: Optional[dict[str, Any]] = None  # the host check around the load (experiments/sweep/host.py)
    step_probe: Optional[dict[str, Any]] = None  # the engine's step time before and after (sweep/probe.py)
    validity: Optional[Validity] = None
    goodput: Optional[GoodputSearch] = None
    config: Any = None
    t0_monotonic: float = 0.0  # the origin of every *_s column (monotonic; 0 on a virtual clock)

    def __post_init__(self) -> None:
        # The aggregates know the definition they were judged under; SLOs built from the two thresholds alone
        # would report `mean` beside an attainment that is not.
        if self.aggregates.tpot_definitions and self.slo.tpot_definition != self.aggregates.tpot_definition:
            object.__setattr__(self, "slo", dataclasses.replace(self.slo,
                                                                tpot_definition=self.aggregates.tpot_definition))

    # --- what the sweep decides from it -------------------------------------------------------------------------

    def checked(self) -> Validity:
        """Is this measurement one to plot? The client kept its schedule, the host was quiet, the run is whole."""
        if self.goodput is not None and self.validity is not None:
            return self.validity  # a search's validity is its probes'
        reasons = [f"client: {r}" for r in self.self_check.get("reasons", [])]
        reasons += (self.host or {}).get("reasons", [])
        reasons += (self.step_probe or {}).get("reasons", [])
        comp = self.completeness or {}
        if self.interrupted:
            reasons.append(f"interrupted ({self.signal or 'requests cancelled'})")
        elif comp and not comp.get("complete", True):
            reasons.append(f"incomplete: {comp['rows']} of {comp['planned']} requests recorded, "
                           f"{comp['not_sent']} not sent, {comp['cancelled']} cancelled")
        return Validity(not reasons, tuple(reasons))

    def with_checks(self, **parts) -> RunResult:
        """This result with what was checked around it (`host`, `step_probe`, `completeness`), judged."""
        r = dataclasses.replace(self, **parts)
        return dataclasses.replace(r, validity=r.checked())

    @property
    def status(self) -> str:
        if self.interrupted:
            return "interrupted"
        return "ok" if (self.completeness or {}).get("complete", True) else "incomplete"

    def row(self) -> dict[str, Any]:
        """The job's row: statistics and their 95% intervals, counts, lengths, validity."""
        a = self.aggregates
        out: dict[str, Any] = {
            "slo_attainment": a.slo_attainment, "goodput_rps": a.goodput, "request_throughput": a.request_throughput,
            "output_token_throughput": a.output_token_throughput, "num_requests": a.num_requests,
            "prefix_cache_hit_rate": a.prefix_cache_hit_rate,
            "num_errors": a.num_errors, "client_valid": self.self_check.get("valid", True),
            "endpoint": self.endpoint,  # what was measured: None when simulated
            # requests that did not fit the server's context (clamped, dropped or sent: loadgen.over_context)
            "over_context": (self.context or {}).get("over_context")}
        td, ss = a.tpot_definitions, a.steady_state or {}
        out["tpot_definition"] = a.tpot_definition
        for d in M.TPOT_DEFINITIONS:
            out[f"slo_attainment_tpot_{d}"] = (td.get("slo_attainment") or {}).get(d)
        out["stalled_requests"], out["stalled_fraction"] = td.get("stalled_requests"), td.get("stalled_fraction")
        out["steady_state"], out["backlog_growth"] = ss.get("steady_state"), ss.get("backlog_growth")
        if self.workload.lengths:
            out["mean_prompt_tokens"] = self.workload.lengths["prompt_tokens"]["mean"]
            out["mean_output_tokens"] = self.workload.lengths["output_tokens"]["mean"]
            out["length_warnings"] = len(self.workload.length_warnings)
        for m in ("ttft_s", "tpot_s", "itl_s", "e2e_s"):
            for q in QUANTILES:
                out[f"{q}_{m}"] = getattr(a.latency(m), q)
        if a.ci:
            for name, key in _CI_KEYS.items():
                out[f"{name}_ci_low"], out[f"{name}_ci_high"] = a.interval(key)
            for m in ("ttft_s", "tpot_s", "itl_s", "e2e_s"):
                for q in QUANTILES:
                    out[f"{q}_{m}_ci_low"], out[f"{q}_{m}_ci_high"] = a.interval(f"{m}.{q}")
            out["duration_s"] = a.duration_s
        return out

    def validity_columns(self) -> dict[str, Any]:
        v, host, sp = self.validity or self.checked(), self.host or {}, self.step_probe or {}
        out = {"valid": v.valid, "invalid_reasons": "; ".join(v.reasons),
               "host_valid": host.get("valid", True), "host_checked": host.get("checked", False)}
        for k in ("foreign_cpu_frac", "steal_frac", "loadavg_1m_start", "loadavg_1m_end"):
            if k in host:
                out[f"host_{k}"] = host[k]
        for k in ("before", "after", "calibrated"):
            if sp.get(k):
                out[f"step_probe_{k}_tpot_s"] = sp[k]["tpot_s"]
        return out

    # --- summary.json -------------------------------------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        agg = self.aggregates.to_dict()
        d: dict[str, Any] = {
            "aggregates": agg, "self_check": self.self_check,
            "slo": dataclasses.asdict(self.slo), "workload": dataclasses.asdict(self.workload),
            "model": self.model, "base_url": self.base_url, "interrupted": self.interrupted,
            "length_mismatch": self.length_mismatch, "config": self.config, "t0_monotonic": self.t0_monotonic}
        for k in _BLOCKS:
            v = agg.pop(k)
            if v:
                d[k] = v
        for k in _OPTIONAL:
            v = getattr(self, k)
            if v is not None:
                d[k] = dataclasses.asdict(v) if dataclasses.is_dataclass(v) else v
        if "validity" in d:
            d["validity"]["reasons"] = list(d["validity"]["reasons"])
        if self.goodput is not None:  # the search's keys at the top, as a goodput job's summary.json has them
            d.update(dataclasses.asdict(self.goodput), probes=list(self.goodput.probes))
        return d

    def write(self, out_dir) -> None:
        (Path(out_dir) / "summary.json").write_text(json.dumps(self.to_dict(), indent=2, default=str))

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> RunResult:
        w = d.get("workload") or {}
        names = {f.name for f in dataclasses.fields(WorkloadRun)}
        v = d.get("validity")
        search = None
        if "goodput_rate" in d:
            search = GoodputSearch(**{f.name: d[f.name] for f in dataclasses.fields(GoodputSearch)
                                      if f.name in d and f.name != "probes"}, probes=tuple(d.get("probes", ())))
        agg = {**d["aggregates"], **{k: d[k] for k in _BLOCKS if k in d}}
        return cls(aggregates=Aggregates.from_dict(agg), slo=SLOs(**d["slo"]),
                   workload=WorkloadRun(**{k: x for k, x in w.items() if k in names}),
                   self_check=d.get("self_check") or {"valid": True, "reasons": []},
                   **{k: d[k] for k in ("model", "endpoint", "base_url", "interrupted", "signal", "completeness",
                                        "length_mismatch", "context", "backend", "host", "step_probe", "config",
                                        "t0_monotonic") if k in d},
                   validity=Validity(v["valid"], tuple(v["reasons"])) if v else None, goodput=search)

    @classmethod
    def load(cls, path) -> RunResult:
        """A summary.json (or the job directory holding one) read back."""
        p = Path(path)
        return cls.from_dict(json.loads((p / "summary.json" if p.is_dir() else p).read_text()))

    def __getitem__(self, key: str) -> Any:
        """summary.json's keys, for scripts written against the dictionary this used to be."""
        return self.to_dict()[key]

    def get(self, key: str, default: Any = None) -> Any:
        return self.to_dict().get(key, default)


def measured(df: pd.DataFrame, lcfg, slo, offered_rate: Optional[float] = None, marked: bool = False,
             sample_cis: Optional[dict[str, Any]] = None) -> tuple[pd.DataFrame, Aggregates]:
    """The requests with the measurement window marked (warm-up and cool-down out: `loadgen.*`), and the
    statistics over that window against the SLOs (TPOT read as `slo.tpot_definition`), with whether the run
    reached steady state (and, for conversations, the `offered_rate` in requests/s): the one computation both
    backends share. Runs judged alike (the same rows, the same window, other SLOs) may share what does not read
    the SLOs: rows already `marked` by this function, and their `sample_cis` (uncertainty.request_cis)."""
    definition = M.check_tpot_definition(getattr(slo, "tpot_definition", "mean"))
    if not marked:
        df = M.mark_measured(df, lcfg, conversations=offered_rate is not None)
    window = df[df["measured"]]
    sent = window["send_s"].dropna()
    duration = float(window["finish_s"].max() - sent.min()) if len(sent) else 0.0
    agg = M.aggregate(window, slo.ttft_s, slo.tpot_s, duration, definition, sample_cis)
    agg["steady_state"] = M.steady_state(df, M.slo_met(window, slo.ttft_s, slo.tpot_s, definition), offered_rate)
    return df, Aggregates.from_dict(agg)


def offered_rate(workload, wcfg) -> Optional[float]:
    """The requests/s a multi-turn run was to offer (its turns are sent after answers, so it may fall short);
    None where the arrivals alone decide it."""
    return wcfg.rate if workload.num_conversations and wcfg.arrival in ("poisson", "gamma", "constant") else None


def workload_run(workload, wcfg, num_requests: int, lengths: dict[str, Any]) -> WorkloadRun:
    return WorkloadRun(name=workload.name, num_requests=num_requests, arrival=wcfg.arrival, rate=wcfg.rate,
                       num_clipped=workload.num_clipped, lengths=lengths or {},
                       num_conversations=workload.num_conversations)
