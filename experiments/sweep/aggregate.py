"""Sweep aggregation: every job of a multirun -> one parquet, one summary table, points, goodput, figures.

Registered as a Hydra callback (`on_multirun_start` refuses parallel launches that would share cores,
`on_multirun_end` aggregates), and callable on any sweep directory (`aggregate_sweep`). Writes:
  summary.csv        one row per job (failed, interrupted and invalid ones included, with status, `valid` and
                     `invalid_reasons`), headline statistics with their 95% intervals (`*_ci_low`, `*_ci_high`)
  requests.parquet   every request, tagged with its job, swept keys and the run's validity
  points.csv         one row per point (swept keys but the seed): valid runs pooled over seeds, intervals over
                     requests and seeds, n_requests / n_seeds / n_runs / n_invalid behind each
  goodput.csv        goodput per curve with goodput_at_range_top / goodput_monotone and its interval
"""

from __future__ import annotations

import json
import logging
import math
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any, Optional

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
from hydra.experimental.callback import Callback
from omegaconf import DictConfig

from experiments.analysis.sweep_dir import PER_TOKEN, job_dirs
from experiments.loadgen.rows import join_rows, with_columns

log = logging.getLogger(__name__)
ROOT = Path(__file__).resolve().parents[2]  # the repository root
TABLE_COLUMNS = ["engine", "rate", "load", "status", "slo_attainment", "p90_ttft_s", "p90_tpot_s", "mean_e2e_s",
                 "request_throughput", "goodput_rate", "num_errors"]
# Shown with their 95% interval next to them in the terminal table.
_TABLE_CI = ("slo_attainment", "p90_ttft_s", "p90_tpot_s")


def _override_value(v: str) -> Any:
    try:
        return json.loads(v)
    except (json.JSONDecodeError, TypeError):
        return v


_WRITING: list[_Writer] = []
SIDE_FIGURES_MIN_JOBS = 16  # below, a second process costs more to start than the figures it would draw


class _Writer(threading.Thread):
    def __init__(self, jobs: list[tuple[Path, dict[str, Any]]], out: Path):
        super().__init__(name="sweep-requests")
        self.jobs, self.out, self.error = jobs, out, None

    def run(self) -> None:
        try:
            join_rows(self.jobs, self.out)
        except BaseException as e:  # raised where the sweep waits for the file, not lost in this thread
            self.error = e


def wait_for_requests() -> None:
    """Until every sweep requests.parquet being written in the background is on disk (its error raised here)."""
    while _WRITING:
        w = _WRITING.pop()
        w.join()
        if w.error is not None:
            raise w.error


def aggregate_sweep(sweep_dir: str | Path, with_points: bool = False, wait: bool = True):
    """(summary, requests), and with `with_points` also (points, goodput); every table is written too.

    `requests` is every job's rows without their per-token lists (no statistic of a sweep reads them; each job's
    ITL statistics came from its own file); the sweep's requests.parquet has them, written by a thread that
    `wait=False` leaves running (`wait_for_requests`), so that the figures are drawn meanwhile."""
    from experiments.analysis import points as P

    sweep_dir = Path(sweep_dir)
    rows, frames, swept_keys, configs, tagged = [], [], set(), [], []
    for jd in job_dirs(sweep_dir):
        job = json.loads((jd / "job.json").read_text())
        job.pop("traceback", None)
        swept = {k: _override_value(v) for k, v in (job.pop("overrides", None) or {}).items()}
        swept_keys.update(swept)
        slo = job.pop("slo", None) or {}
        if isinstance(job.get("cores"), list):
            job["cores"] = ",".join(str(c) for c in job["cores"])
        row = {"job": str(jd.relative_to(sweep_dir)), **job, **{f"slo_{k}": v for k, v in slo.items()},
               **{k: v for k, v in swept.items() if k not in ("engine",)}}
        rows.append(row)
        prov = jd / "provenance.json"
        configs.append(json.loads(prov.read_text()).get("config") if prov.is_file() else None)
        req = jd / "requests.parquet"
        if req.is_file():
            extra = {"job": row["job"], "engine": job["engine"], "rate": job["rate"], "status": job["status"],
                     "run_valid": job.get("valid", True) is not False and job.get("client_valid", True) is not False,
                     "slo_ttft_s": slo.get("ttft_s"), "slo_tpot_s": slo.get("tpot_s"),
                     "slo_tpot_definition": slo.get("tpot_definition", "mean"), **swept}
            # A list-valued override (experiment.goodput_seeds=[0,1]) is one value per row, not a column.
            extra = {k: json.dumps(v) if isinstance(v, (list, dict)) else v for k, v in extra.items()}
            tagged.append((req, extra))
            names = pq.read_schema(req).names
            frames.append(with_columns(pq.read_table(req, columns=[c for c in names if c not in PER_TOKEN]), extra))
    summary = pd.DataFrame(rows)
    summary.attrs["swept"] = sorted(swept_keys)
    summary.to_csv(sweep_dir / "summary.csv", index=False)
    requests = pd.DataFrame()
    if frames:
        requests = pa.concat_tables(frames, promote_options="permissive").to_pandas()
        writer = _Writer(tagged, sweep_dir / "requests.parquet")
        writer.start()
        _WRITING.append(writer)
        if wait:
            wait_for_requests()
    pts = P.points(summary, requests, summary.attrs["swept"])
    gp = P.goodput_table(pts, summary, P.target_attainment(configs), summary.attrs["swept"])
    for name, df in (("points.csv", pts), ("goodput.csv", gp)):
        if not df.empty:
            df.to_csv(sweep_dir / name, index=False)
    (sweep_dir / "sweep.json").write_text(json.dumps({"swept": summary.attrs["swept"],
                                                      "point_keys": pts.attrs.get("keys", [])}))
    return (summary, requests, pts, gp) if with_points else (summary, requests)


def _interval(lo, hi, scale: float, digits: int) -> str:
    def f(x):
        if x is None or (isinstance(x, float) and math.isnan(x)):
            return "?"
        return "inf" if math.isinf(x) else f"{x * scale:.{digits}f}"

    return f"[{f(lo)},{f(hi)}]"


def format_table(summary: pd.DataFrame, swept: list[str] = ()) -> str:
    """One line per job: values in ms / %, the 95% interval beside attainment and P90 latencies, validity."""
    if summary.empty:
        return "(no jobs)"
    extra = [k for k in swept if k in summary.columns and k not in ("engine", "workload.rate", "workload.load", "experiment")
             and summary[k].astype(str).nunique() > 1]  # a key given one value on the command line is no column
    cols = ["engine", *extra] + [c for c in TABLE_COLUMNS if c in summary.columns and c != "engine"]
    df = summary[cols].copy()
    if "valid" in summary:
        df.insert(df.columns.get_loc("status") + 1 if "status" in df else len(df.columns), "valid",
                  summary["valid"].map(lambda v: "no" if v is False or str(v) == "False" else "yes"))
    for c in _TABLE_CI:
        lo, hi = f"{c}_ci_low", f"{c}_ci_high"
        if c in df and lo in summary:
            scale, digits = (100, 1) if c == "slo_attainment" else (1e3, 1)
            df.insert(df.columns.get_loc(c) + 1, c.replace("_s", "_ms").replace("slo_attainment", "attainment")
                      + "_95ci", [_interval(a, b, scale, digits) for a, b in zip(summary[lo], summary[hi])])
    for c in ("p90_ttft_s", "p90_tpot_s", "mean_e2e_s"):
        if c in df:
            df[c] = (df[c] * 1e3).round(1)
            df = df.rename(columns={c: c.replace("_s", "_ms")})
    if "slo_attainment" in df:
        df["slo_attainment"] = (df["slo_attainment"] * 100).round(1)
    return df.sort_values([c for c in ("engine", *extra, "rate") if c in df]).to_string(index=False)


def format_points(pts: pd.DataFrame) -> str:
    """One line per point with how many requests and seeds stand behind it."""
    if pts is None or pts.empty:
        return ""
    keys = pts.attrs.get("keys", ["engine", "rate"])
    out = pts[keys].copy()
    out["n_req"], out["seeds"] = pts["n_requests"], pts["n_seeds"]
    out["invalid"] = pts["n_invalid"].astype(str) + "/" + pts["n_runs"].astype(str)
    for c, scale, name in (("slo_attainment", 100, "attain_%"), ("p90_ttft_s", 1e3, "p90_ttft_ms"),
                           ("p90_tpot_s", 1e3, "p90_tpot_ms"), ("mean_e2e_s", 1, "mean_e2e_s")):
        if c in pts:
            out[name] = (pts[c] * scale).round(1 if scale != 1 else 2)
            out[name + "_95ci"] = [_interval(a, b, scale, 1 if scale != 1 else 2)
                                   for a, b in zip(pts[f"{c}_ci_low"], pts[f"{c}_ci_high"])]
    return out.to_string(index=False)


def format_goodput(gp: pd.DataFrame) -> str:
    if gp is None or gp.empty:
        return ""
    lines = []
    for _, r in gp.iterrows():
        what = " ".join(f"{k}={r[k]}" for k in gp.columns if k == "engine" or ("." in k and k != "goodput_rate"))
        ci = (f" (95% CI {r['goodput_ci_low']:.2f}-{r['goodput_ci_high']:.2f})"
              if "goodput_ci_low" in r and pd.notna(r.get("goodput_ci_low")) else "")
        flags = []
        if r.get("goodput_at_range_top") is True or r.get("goodput_at_range_top") == 1:
            flags.append("at the top of the tested range: a lower bound")
        if r.get("goodput_at_range_bottom") is True or r.get("goodput_at_range_bottom") == 1:
            flags.append("below the lowest tested rate")
        if r.get("goodput_monotone") is False or r.get("goodput_monotone") == 0:
            flags.append("attainment not monotone in rate")
        if r.get("goodput_invalid_points"):
            flags.append(f"read across {int(r['goodput_invalid_points'])} invalid point(s)")
        lines.append(f"goodput {what}: {r['goodput_rate']:.2f} req/s{ci}" + (f"  [{'; '.join(flags)}]" if flags else ""))
    return "\n".join(lines)


class _JobFigures:
    """`python -m experiments.analysis.figures --job-files SWEEP` running beside the aggregation. `ready`: started
    before the sweep's jobs (its imports, ~2.5 s, paid while the sweep is still validated, not at its end) and
    waiting on its stdin for `go`; it exits at end-of-file (a sweep that never ends closes the pipe)."""

    def __init__(self, sweep_dir: Path, ready: bool = False):
        self.ready, self._paths = ready, None
        self.proc = subprocess.Popen([sys.executable, "-m", "experiments.analysis.figures", "--job-files",
                                      *(["--on-go"] if ready else []), str(sweep_dir)], cwd=ROOT,
                                     stdin=subprocess.PIPE if ready else None, stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE, text=True)

    def go(self) -> None:
        if self.ready:
            self.ready = False
            try:
                self.proc.stdin.write("go\n")
                self.proc.stdin.flush()
            except (BrokenPipeError, ValueError):  # it died: `paths` says so
                pass

    def paths(self) -> list[str]:
        """Its figures' files, once drawn (asked again, the same)."""
        if self._paths is None:
            self.go()
            out, err = self.proc.communicate()
            if self.proc.returncode:
                log.warning("the partition and server figures failed: %s", err.strip()[-2000:])
                self._paths = []
            else:
                self._paths = [p for p in out.splitlines() if p.strip()]
        return self._paths

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


# The second figure process of each sweep running here, started with it (not on the callback: Hydra pickles its
# callbacks into every job's context, and a process is not picklable).
_SIDE: dict[str, _JobFigures] = {}


def start_side_figures(config: DictConfig, n_jobs: int) -> None:
    """The sweep's second figure process, started now (its imports beside the sweep's start, not at its end) for a
    sweep of enough jobs; once per sweep (a simulated sweep's callback starts it with the pool's pre-start, before
    the jobs are checked)."""
    key = str(config.hydra.sweep.dir)
    if n_jobs >= SIDE_FIGURES_MIN_JOBS and key not in _SIDE:
        _SIDE[key] = _JobFigures(Path(key), ready=True)


def finish_sweep(sweep_dir: Path, wandb_cfg=None, experiment: Optional[str] = None,
                 side: Optional[_JobFigures] = None) -> None:
    """Aggregate, print, draw; with `wandb_cfg`, log the sweep's summary run into the group `experiment`. `side`:
    the second figure process, started with the sweep (`_JobFigures(..., ready=True)`)."""
    from experiments.analysis import figures
    from experiments.sweep import tracking

    # The figures drawn from the jobs' own files need no aggregation: a large sweep draws them in a second process
    # meanwhile (a new interpreter: this one runs a writer thread, which a fork would copy mid-flight).
    if side is None and len(job_dirs(sweep_dir)) >= SIDE_FIGURES_MIN_JOBS:
        side = _JobFigures(sweep_dir)
    if side is not None:
        side.go()
    try:
        summary, requests, pts, gp = aggregate_sweep(sweep_dir, with_points=True, wait=False)
        # The summary as its file reads (the figures' captions read it so), the rest as just made.
        tables = (pd.read_csv(sweep_dir / "summary.csv"), requests, pts, gp)
        if side is None:
            paths = figures.make_figures(sweep_dir, tables)
        else:  # the side's figures are asked for last (the W&B run logs everything else meanwhile)
            paths = figures.sweep_figures(sweep_dir, tables)
        n_ok = int((summary["status"] == "ok").sum()) if len(summary) else 0
        n_invalid = int((summary["valid"].map(lambda v: v is False or str(v) == "False")).sum()) \
            if "valid" in summary else 0
        table = format_table(summary, summary.attrs.get("swept", []))
        print(f"\nsweep {sweep_dir}: {len(summary)} jobs ({n_ok} ok, {n_invalid} invalid)\n{table}")
        if not pts.empty and (pts["n_seeds"] > 1).any():
            print(f"\npoints (seeds pooled; 95% intervals over requests and seeds):\n{format_points(pts)}")
        if not gp.empty:
            print("\n" + format_goodput(gp))
        if n_invalid and "invalid_reasons" in summary:
            print("\ninvalid runs (left out of the figures' lines):")
            for _, r in summary[summary["valid"].map(lambda v: v is False or str(v) == "False")].iterrows():
                print(f"  {r['job']}: {r['invalid_reasons']}")
        if wandb_cfg is not None:
            try:
                tracking.log_sweep(wandb_cfg, str(sweep_dir), summary, paths, group=experiment or sweep_dir.name,
                                   points=pts, goodput=gp, more_figures=side.paths if side is not None else None)
            except Exception as e:
                log.warning("W&B sweep logging failed: %s", e)
        if side is not None:
            side.paths()  # drawn, whether W&B asked or not
    finally:
        if side is not None:
            side.stop()
    wait_for_requests()  # the sweep's requests.parquet, written while the figures were drawn
    print(f"aggregate: {sweep_dir / 'requests.parquet'}, {sweep_dir / 'summary.csv'}; figures: {sweep_dir / 'figures'}")


def check_launch(config: DictConfig) -> None:
    """Refuse a parallel launch that would make jobs share cores (experiments/sweep/cores.py)."""
    from experiments.sweep import cores

    n_jobs = cores.launcher_jobs(config.hydra.get("launcher"))
    if n_jobs is None or n_jobs <= 1:  # None: the launcher sizes itself to fit
        return
    params = config.hydra.get("sweeper", {}).get("params") or {}
    backends = {config.backend.name} | set(str(params.get("backend", "")).replace("backend=", "").split(",")) - {""}
    per_job = max(cores.cores_needed(b, config.experiment.cores_per_job) for b in backends)
    cores.check_parallel(n_jobs, per_job)


class AggregateCallback(Callback):
    """hydra.callbacks.aggregate: checks the launch before any job starts, aggregates once every job has run."""

    def __init__(self) -> None:
        self.started: Optional[float] = None
        self.estimate_s: Optional[float] = None

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        from experiments.sweep import plan
        from experiments.sweep.capacity import sweep_overrides
        from experiments.sweep.launchers import prestart_local

        self.started = time.monotonic()
        try:
            check_launch(config)
            if prestart_local(config):  # a simulated sweep's pool, and its figure process, start beside the checks
                try:
                    start_side_figures(config, len(sweep_overrides(config)))
                except Exception as e:  # started below, after the checks
                    log.debug("figure process pre-start failed: %s", e)
            start_side_figures(config, plan.check_jobs(config))
            # Real engines: the machine's dtype and capacity decided once, and the sweep's wall time estimated.
            self.estimate_s = plan.announce(config, config.hydra.sweep.dir)
        except ValueError as e:  # Hydra turns a callback's exception into a warning: stop here instead
            print(f"error: {e}", file=sys.stderr)
            raise SystemExit(2) from None

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        from experiments.sweep.config import WandbConfig
        from semipd_engine.config import freeze

        finish_sweep(Path(config.hydra.sweep.dir), freeze(WandbConfig, config.wandb), config.experiment.name,
                     _SIDE.pop(str(config.hydra.sweep.dir), None))
        if self.started is not None and self.estimate_s:
            print(f"wall time {(time.monotonic() - self.started) / 60:.1f} min (estimated "
                  f"{self.estimate_s / 60:.1f} min before the start)")


def main() -> None:
    """`python -m experiments.sweep.aggregate <sweep dir>`: aggregate and draw a sweep that did not end (or again)."""
    if len(sys.argv) != 2 or not Path(sys.argv[1]).is_dir():
        print("usage: python -m experiments.sweep.aggregate <sweep dir>", file=sys.stderr)
        sys.exit(2)
    finish_sweep(Path(sys.argv[1]))


if __name__ == "__main__":
    main()
