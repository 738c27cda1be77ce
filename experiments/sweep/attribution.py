"""Where a published gain comes from: semi-PD's goodput ratio to a baseline, attributed factor by factor.

`python run.py experiment=paper_attribution` (one job, `experiment.mode=attribution`, backend=sim). The setting
starts like for like (every engine on one serving stack, steady-state runs, one request cap, a TPOT that a
stall after the first token cannot hide behind, the share model's defaults) and each factor of
`experiment.attribution.factors` moves one part of it to what the paper ran (each system's own stack, 1000
prompts per point, each system's own cap on running requests, the mean TPOT, real ShareGPT lengths, semi-PD's
own share fits without contention). Every subset of the factors is a setting; in each, every engine's goodput is
found by the same bisection as `experiment=goodput` (rates per GPU, `experiment.goodput_*`), so the ratio
v(S) = log(goodput(target) / goodput(baseline)) is known for all 2^n settings and each factor's contribution is
its Shapley value: its marginal effect on v averaged over every order in which the factors can be added. The
contributions add up exactly to v(all) - v(none), so the table does not depend on an order; the one-at-a-time
path in the listed order is reported beside it.

Cost is kept down without changing any number: a goodput search depends only on the configs it composes, so
settings that differ in a factor that does not touch an engine (the share model of a unified engine) share
its search; a simulation depends only on what is simulated, so settings that differ
only in how a run is judged (the TPOT definition) judge the same runs, and a search starts from the bracket its
family's runs already give (no new simulation), else from the engine's goodput in the last setting.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import logging
import math
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Optional

import numpy as np
import pandas as pd

log = logging.getLogger(__name__)

PAPER_RATIO = (1.55, 1.72)
CONF_DIR = Path(__file__).resolve().parents[2] / "conf"  # the repository's conf/ (as conf_store.CONF_DIR)  # semi-PD's goodput over vLLM's in the paper's Llama-3-8B ShareGPT setting


def _compose(overrides: dict[str, str]):
    """The job config for `overrides`, composed as `run.py` would (inside a Hydra app or not)."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    items = [f"{k}={v}" for k, v in overrides.items()]
    if GlobalHydra.instance().is_initialized():
        return compose("config", overrides=items)
    # The schemas are registered by whoever composed the job's own config (run.py, conf_store.register()).
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base=None):
        return compose("config", overrides=items)


def _overrides(base: dict[str, str], extra: list[str]) -> dict[str, str]:
    out = dict(base)
    for o in extra:
        key, _, value = o.partition("=")
        out[key] = value
    return out


@dataclasses.dataclass
class Searcher:
    """Goodput of one composed job config, memoised by everything that changes it."""

    base: dict[str, str]
    make_job: Callable[[Any], Any]  # a composed config -> its validated job (experiments.sweep.job.Job.from_cfg)
    n_sims: int = 0
    sim_wall_s: float = 0.0
    _runs: dict[str, pd.DataFrame] = dataclasses.field(default_factory=dict)
    _goodput: dict[str, tuple[float, list[dict]]] = dataclasses.field(default_factory=dict)
    _last: dict[str, float] = dataclasses.field(default_factory=dict)
    _rates: dict[str, set[float]] = dataclasses.field(default_factory=dict)  # simulated, per family (see _family)

    def job(self, engine: str, extra: list[str]):
        return self.make_job(_compose(_overrides(self.base, [f"engine={engine}", *extra])))

    def frame(self, job, rate_per_gpu: float) -> pd.DataFrame:
        from experiments.loadgen.result import offered_rate
        from experiments.sweep import simulated

        wcfg = dataclasses.replace(job.workload, rate=rate_per_gpu * job.num_gpus)
        key = simulated.simulation_key(job.model, job.engine, job.hardware, job.backend, job.loadgen, wcfg)
        if key not in self._runs:
            from experiments.analysis import request_metrics as M

            t0 = time.perf_counter()
            run, workload, _ = simulated.simulation(job.model, job.engine, job.hardware, job.backend, job.loadgen,
                                                    wcfg)
            df = M.mark_measured(M.derive(run.frame, job.loadgen.measure_from), job.loadgen,
                                 conversations=offered_rate(workload, wcfg) is not None)
            self._runs[key] = df[df["measured"]]  # the window `result.measured` judges
            self.n_sims += 1
            self.sim_wall_s += time.perf_counter() - t0
        return self._runs[key]

    @staticmethod
    def _family(job) -> str:
        """What a simulation depends on but the rate: searches of one family judge the same runs (settings that
        differ only in how a run is judged, e.g. the TPOT definition)."""
        return json.dumps([dataclasses.asdict(job.engine), dataclasses.asdict(job.backend),
                           dataclasses.asdict(job.workload), dataclasses.asdict(job.model),
                           dataclasses.asdict(job.hardware), list(job.experiment.goodput_seeds)],
                          sort_keys=True, default=str)

    def attainment(self, job, rate: float) -> float:
        """SLO attainment as `result.measured` computes it (the same window and `slo_met`), without the intervals
        and checks a search does not read."""
        from experiments.analysis import request_metrics as M

        vals = []
        for seed in job.experiment.goodput_seeds:
            j = dataclasses.replace(job, workload=dataclasses.replace(job.workload, seed=seed))
            window = self.frame(j, rate)
            met = M.slo_met(window, job.slo.ttft_s, job.slo.tpot_s, job.slo.tpot_definition)
            vals.append(float(met.mean()) if len(window) else 0.0)
        self._rates.setdefault(self._family(job), set()).add(rate)
        return float(np.mean(vals))

    def goodput(self, engine: str, extra: list[str]) -> tuple[float, list[dict]]:
        job = self.job(engine, extra)
        key = json.dumps([self._family(job), dataclasses.asdict(job.slo)], default=str)
        if key not in self._goodput:
            self._goodput[key] = self._search(job, self._last.get(engine))
            self._last[engine] = self._goodput[key][0]
        return self._goodput[key]

    def _search(self, job, guess: Optional[float]) -> tuple[float, list[dict]]:
        """Highest rate per GPU with attainment >= target, to `goodput_tolerance`, in [goodput_low, goodput_high]:
        bracketed by the rates its family already simulated (judged again, no new run), else around `guess` (a
        neighbouring setting's goodput), then bisected."""
        exp, target = job.experiment, job.slo.target_attainment
        lo, hi, tol = exp.goodput_low, exp.goodput_high, exp.goodput_tolerance
        probes: list[dict] = []

        def ok(rate: float) -> bool:
            a = self.attainment(job, rate)
            probes.append({"rate": rate, "attainment": a})
            return a >= target

        known = sorted(r for r in self._rates.get(self._family(job), ()) if lo <= r <= hi)
        if known:
            verdicts = [(r, ok(r)) for r in known]
            passing = [r for r, v in verdicts if v]
            if passing:
                lo = max(passing)
            hi = min([r for r, v in verdicts if not v and r > lo], default=hi)
        elif guess is not None and lo < guess < hi:  # bracket: widen from the guess until the target is crossed
            step = 4 * tol
            if ok(guess):
                lo = guess
                while lo + step < hi and ok(lo + step):
                    lo, step = lo + step, step * 2
                hi = min(hi, lo + step)
            else:
                hi = guess
                while hi - step > lo and not ok(hi - step):
                    hi, step = hi - step, step * 2
                lo = max(lo, hi - step)
        if not ok(lo):
            return 0.0, probes
        if ok(hi):
            return hi, probes
        while hi - lo > tol:
            mid = (lo + hi) / 2
            lo, hi = (mid, hi) if ok(mid) else (lo, mid)
        return lo, probes


def shapley(values: dict[frozenset, float], names: list[str]) -> dict[str, float]:
    """Each factor's marginal effect on v averaged over all orders (the Shapley value of the game v)."""
    n = len(names)
    out = {}
    for f in names:
        rest = [g for g in names if g != f]
        total = 0.0
        for k in range(n):
            w = math.factorial(k) * math.factorial(n - k - 1) / math.factorial(n)
            for s in itertools.combinations(rest, k):
                s = frozenset(s)
                total += w * (values[s | {f}] - values[s])
        out[f] = total
    return out


def run(job, jd: Path, overrides: dict[str, str], make_job: Callable[[Any], Any]) -> dict[str, Any]:
    """Every setting, every engine's goodput, the contributions; writes the tables, the figure and a summary."""
    from experiments.sweep.config import FactorConfig

    att = job.experiment.attribution
    factors = [FactorConfig(**f) if isinstance(f, dict) else f for f in att.factors]
    names = [f.name for f in factors]
    if not factors:
        raise ValueError("experiment.attribution.factors is empty: nothing to attribute")
    if len(set(names)) != len(names):
        raise ValueError(f"experiment.attribution.factors: names must be unique, got {names}")
    base = {k: v for k, v in overrides.items() if k != "engine"}  # the engine preset is the setting's; its keys stay
    searcher = Searcher(base, make_job)
    engines = [att.target, *att.baselines]
    t0 = time.perf_counter()
    rows = []
    for k in range(len(factors) + 1):
        for on in itertools.combinations(names, k):
            on = frozenset(on)
            row: dict[str, Any] = {f: f in on for f in names}
            for engine in engines:
                extra = []
                for f in factors:
                    if f.engines and engine not in f.engines:
                        extra += list(f.like)
                    else:
                        extra += list(f.paper if f.name in on else f.like)
                g, probes = searcher.goodput(engine, extra)
                row[f"goodput_{engine}"] = g
                row[f"probes_{engine}"] = len(probes)
                # passed even at goodput_high: the goodput is at least that, and a ratio with it a bound
                row[f"at_range_top_{engine}"] = g >= job.experiment.goodput_high
            rows.append(row)
            log.info("attribution: %s -> %s (%.0f s)", sorted(on) or "like for like",
                     {e: row[f"goodput_{e}"] for e in engines}, time.perf_counter() - t0)
    settings = pd.DataFrame(rows)
    floor = job.experiment.goodput_tolerance / 2  # a goodput of 0 (failed at goodput_low) counts as half a step
    table, summary = [], {"target": att.target, "baselines": list(att.baselines), "factors": names,
                          "paper_ratio": list(PAPER_RATIO)}
    for b in att.baselines:
        ratio = (settings[f"goodput_{att.target}"].clip(lower=floor) / settings[f"goodput_{b}"].clip(lower=floor))
        settings[f"ratio_{b}"] = ratio
        values = {frozenset(n for n in names if r[n]): math.log(ratio[i]) for i, r in settings.iterrows()}
        phi = shapley(values, names)
        none, every = values[frozenset()], values[frozenset(names)]
        path, on = [], frozenset()
        for f in names:  # the one-at-a-time path in the listed order
            before = values[on]
            on = on | {f}
            path.append(values[on] - before)
        for f, step in zip(factors, path):
            table.append({"baseline": b, "factor": f.name, "label": f.label, "shapley_log": phi[f.name],
                          "shapley_x": math.exp(phi[f.name]), "in_order_log": step, "in_order_x": math.exp(step)})
        summary[b] = {"ratio_like_for_like": math.exp(none), "ratio_paper_setting": math.exp(every),
                      "contributions_x": {n: math.exp(phi[n]) for n in names},
                      "unexplained_x_to_paper": [p / math.exp(every) for p in PAPER_RATIO]}
    contrib = pd.DataFrame(table)
    settings.to_csv(jd / "attribution_settings.csv", index=False)
    contrib.to_csv(jd / "attribution.csv", index=False)
    summary.update(wall_s=time.perf_counter() - t0, simulations=searcher.n_sims, sim_wall_s=searcher.sim_wall_s,
                   settings_at_range_top=int(settings[[f"at_range_top_{e}" for e in engines]].any(axis=1).sum()))
    (jd / "attribution.json").write_text(json.dumps(summary, indent=2, default=float))
    figure(contrib, summary, jd / "attribution.png")
    print(report(contrib, summary, settings, names))
    return summary


def report(contrib: pd.DataFrame, summary: dict, settings: pd.DataFrame, names: list[str]) -> str:
    lines = []
    for b in summary["baselines"]:
        s = summary[b]
        lines.append(f"\n{summary['target']} / {b} goodput: {s['ratio_like_for_like']:.2f}x like for like -> "
                     f"{s['ratio_paper_setting']:.2f}x in the paper's setting (paper: {PAPER_RATIO[0]}-"
                     f"{PAPER_RATIO[1]}x)")
        lines.append(f"  {'factor':<18} {'Shapley':>9} {'in order':>9}  what changes")
        for r in contrib[contrib["baseline"] == b].itertuples():
            lines.append(f"  {r.factor:<18} {r.shapley_x:>8.3f}x {r.in_order_x:>8.3f}x  {r.label}")
    lines.append(f"\n{len(settings)} settings, {summary['simulations']} simulations, {summary['wall_s']:.0f} s")
    if summary.get("settings_at_range_top"):
        lines.append(f"{summary['settings_at_range_top']} setting(s) passed even at experiment.goodput_high: their "
                     "goodput is a lower bound (raise it)")
    return "\n".join(lines)


def figure(contrib: pd.DataFrame, summary: dict, path: Path) -> None:
    """A waterfall per baseline: from the like-for-like ratio, each factor's Shapley contribution, to the
    paper-setting ratio, beside the paper's reported band (log scale: contributions multiply)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import seaborn as sns

    sns.set_theme(style="whitegrid", context="paper")
    bases = summary["baselines"]
    n_factors = len(contrib) // len(bases)
    fig, axes = plt.subplots(1, len(bases), figsize=((1.5 + 0.55 * (n_factors + 2)) * len(bases), 3.4),
                             squeeze=False)
    pal = sns.color_palette("deep")
    for ax, b in zip(axes[0], bases):
        c = contrib[contrib["baseline"] == b]
        s = summary[b]
        level = math.log(s["ratio_like_for_like"])
        levels = [0.0, level]
        labels = ["like for like"]
        ax.bar(0, level, color=pal[7], width=0.6)
        ax.annotate(f"{s['ratio_like_for_like']:.2f}x", (0, level), ha="center", va="bottom", fontsize=8)
        for i, r in enumerate(c.itertuples(), start=1):
            ax.bar(i, r.shapley_log, bottom=level, color=pal[2] if r.shapley_log >= 0 else pal[3], width=0.6)
            top = level + max(r.shapley_log, 0.0)
            ax.annotate(f"x{r.shapley_x:.2f}", (i, top), ha="center", va="bottom", fontsize=8)
            level += r.shapley_log
            levels.append(level)
            labels.append(r.factor)
        ax.bar(len(labels), level, color=pal[0], width=0.6)
        ax.annotate(f"{s['ratio_paper_setting']:.2f}x", (len(labels), level), ha="center", va="bottom", fontsize=8)
        labels.append("paper setting")
        ax.axhspan(math.log(PAPER_RATIO[0]), math.log(PAPER_RATIO[1]), color=pal[1], alpha=0.2, lw=0,
                   label=f"paper: {PAPER_RATIO[0]}-{PAPER_RATIO[1]}x")
        ax.axhline(0, color="0.3", lw=0.8)
        ax.set_xticks(range(len(labels)), labels, rotation=35, ha="right")
        lo = min(min(levels), math.log(PAPER_RATIO[0])) - 0.1
        hi = max(max(levels), math.log(PAPER_RATIO[1])) + 0.15
        ticks = [t for t in (0.5, 0.67, 0.8, 1.0, 1.25, 1.5, 2.0, 2.5, 3.0, 4.0, 6.0) if lo <= math.log(t) <= hi]
        ax.set_yticks([math.log(t) for t in ticks], [f"{t:g}x" for t in ticks])
        ax.set_ylim(lo, hi)
        ax.set_ylabel(f"goodput {summary['target']} / {b}")
        ax.set_title("Shapley contributions (log scale)", fontsize=9)
        ax.legend(loc="upper right", frameon=False)
    fig.tight_layout()
    fig.savefig(path, dpi=150, bbox_inches="tight")
    plt.close(fig)
