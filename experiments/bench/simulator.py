"""Simulator speed: our discrete-event simulator next to DistServe's public one (simdistserve).

    python -m experiments.bench.simulator [--requests 10000] [--rate 24] [--engine unified|disagg|semipd]
        [--simdistserve DISTSERVE_CHECKOUT] [--cpu 0] [--repeats 3] [--out FILE.json]
    python -m experiments.bench.simulator --preset paper_llama3_8b_sharegpt [--baseline OTHER_CHECKOUT]
        [--repeats 1] [--out FILE.json]

The second form times a whole simulated sweep as a user runs it (`python run.py experiment=...`: every job, the
aggregation, the figures, the W&B summary run), beside another checkout of this project if given.

What is measured: the wall-clock time of one simulation of N requests, and from
it the simulated requests per second (N / wall time). Both simulators replay the
same workload: ShareGPT-like lengths from this project's `synthetic` workload and
Poisson arrivals at `--rate` (`experiments.loadgen`).

- Ours: `build_simulator` composes the engine (Llama3-8B on one A100-80G by
  default); the timed region is `sim.run(requests)` alone. The simulator and the
  requests are rebuilt before each repeat, outside the timed region. Reported
  next to the time: iterations, fast-forwarded iterations and events (`sim.stats`).
- simdistserve (with `--simdistserve`, a DistServe checkout): its own entry point,
  `simdistserve.benchmarks.simulate_dist.main`, run in a subprocess with
  `--workload FILE.json --arrival custom`: the file holds our arrivals and
  lengths, so both simulate the same requests. Its profile data covers OPT-13B
  and OPT-66B on A100-80G; OPT-13B with TP=1 is used. `--engine unified` maps to
  its `vllm` backend (one GPU, continuous batching, prefill first, no chunking),
  `disagg` to its `distserve` backend (one prefill and one decode GPU). semi-PD
  has no counterpart there, so `--engine semipd` runs ours alone. Nothing of
  DistServe is changed; the child process wraps two of its calls with timers:
  the timed region is `put_requests_with_interarrivals` + `env.run()` (queueing
  the arrivals and the event loop, the same scope as our `sim.run`). Imports,
  reading the workload file and building the cluster are timed apart (`setup_s`);
  `main`'s analysis after the simulation (per-request pandas frames, SLO
  attainment) is skipped: the child stops `main` once `env.run()` returns.
  It needs `simpy` (`pip install simpy`). One difference in what the same
  lengths mean: simdistserve runs `output_len` decode steps after the prefill,
  ours `output_len - 1` (the prefill makes the first token).

Both run in one process each, all repeats in it, with the garbage collector on
as in normal use (a `gc.collect()` before each repeat); `--cpu N` pins the
benchmark and the child to core N. The table shows min/median wall time over
`--repeats`; simulated req/s and the ratio use the minimum.

The default rate, 24 req/s, saturates Llama3-8B on one A100-80G in our
simulator (`unified`, prefill priority, 256 sequences, 8192 batched tokens):
its saturated service rate is about 19 req/s (completions per second while all
256 slots are busy). In 1,000-request runs the median TTFT per tenth of the
requests stays flat (~30 ms) up to 19 req/s; from 20 req/s on it climbs in the
last tenths, and at 24 req/s from the middle of the run on (0.03 s to 4.7 s), so
24 req/s is about 25% over capacity: the queue grows without bound. (1P1D
disaggregation and semi-PD 50/50 queue at decode instead; their TTFT stays flat.)
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Optional

DEFAULT_RATE = 24.0
SIMDISTSERVE_BACKEND = {"unified": "vllm", "disagg": "distserve"}  # semipd: no counterpart
SIMDISTSERVE_MODEL = "facebook/opt-13b"


# ---------------------------------------------------------------------------- workload


def make_workload(n: int, rate: float, seed: int) -> tuple[list[float], list[int], list[int]]:
    """Arrival offsets (s), prompt and output lengths: the project's synthetic workload, Poisson arrivals."""
    from experiments.loadgen.arrivals import schedule
    from experiments.loadgen.workloads import load_workload
    from experiments.sweep.config import WorkloadConfig
    from semipd_engine.config import freeze

    cfg = freeze(WorkloadConfig, {"name": "synthetic", "num_requests": n, "seed": seed, "arrival": "poisson",
                                  "rate": rate})
    items = load_workload(cfg).items
    arrivals = schedule(cfg, len(items))
    return [float(a) for a in arrivals], [i.prompt_len for i in items], [i.output_len for i in items]


# ---------------------------------------------------------------------------- ours


def our_configs(args):
    from semipd_engine.config import EngineConfig, ModelConfig, freeze
    from semipd_engine.sim.config import BackendConfig, HardwareConfig

    engine: dict[str, Any] = {"name": args.engine, "max_num_seqs": args.max_num_seqs,
                              "max_num_batched_tokens": args.max_num_batched_tokens,
                              "enable_prefix_caching": not args.no_prefix_caching}
    if args.engine in ("unified", "unified_chunked"):
        engine["policy"] = "prefill_priority" if args.engine == "unified" else "chunked"
    if args.engine == "semipd":
        engine.update(prefill_share=args.prefill_share, decode_share=args.decode_share)
    return (freeze(ModelConfig, {"name": args.model, "dtype": "bfloat16"}), freeze(EngineConfig, engine),
            freeze(HardwareConfig, {"name": args.hardware}),
            freeze(BackendConfig, {"name": "sim", "fast_forward": not args.no_fast_forward}))


def run_ours(args, arrivals, prompt_lens, output_lens) -> dict[str, Any]:
    from semipd_engine.sim.build import build_simulator
    from semipd_engine.sim.simulator import make_requests

    model_cfg, engine_cfg, hw_cfg, backend_cfg = our_configs(args)
    runs = []
    describe = ""
    for _ in range(args.repeats):
        t0 = time.perf_counter()
        sim, plat = build_simulator(model_cfg, engine_cfg, hw_cfg, backend_cfg)
        requests = make_requests(arrivals, prompt_lens, output_lens)
        setup = time.perf_counter() - t0
        describe = plat.describe
        gc.collect()
        t0 = time.perf_counter()
        done = sim.run(requests)
        wall = time.perf_counter() - t0
        runs.append({"wall_s": wall, "setup_s": setup, "finished": len(done),
                     "makespan_s": max((r.times.finished for r in done), default=0.0),
                     "iterations": sim.stats.iterations, "fast_forwarded": sim.stats.fast_forwarded,
                     "events": sim.stats.events})
        del sim, requests, done
    return {"simulator": "ours", "model": args.model, "platform": describe, "engine": args.engine,
            "config": {"engine": _asdict(engine_cfg), "backend": _asdict(backend_cfg)}, "runs": runs}


def _asdict(cfg) -> dict[str, Any]:
    import dataclasses

    return dataclasses.asdict(cfg)


# ---------------------------------------------------------------------------- simdistserve


def run_simdistserve(args, arrivals, prompt_lens, output_lens) -> dict[str, Any]:
    """simdistserve on the same requests, in a subprocess (one for all repeats)."""
    checkout = str(Path(args.simdistserve).resolve())
    if not (Path(checkout) / "simdistserve" / "benchmarks" / "simulate_dist.py").is_file():
        raise SystemExit(f"--simdistserve={args.simdistserve}: no simdistserve/benchmarks/simulate_dist.py there "
                         "(pass the root of a DistServe checkout)")
    backend = SIMDISTSERVE_BACKEND[args.engine]
    with tempfile.TemporaryDirectory() as d:
        workload = os.path.join(d, "workload.json")
        with open(workload, "w") as f:  # simulate_dist's custom workload: start_time in seconds
            json.dump([{"start_time": a, "prompt_len": p, "output_len": o}
                       for a, p, o in zip(arrivals, prompt_lens, output_lens)], f)
        argv = ["--backend", backend, "--model", SIMDISTSERVE_MODEL, "--N", str(len(arrivals)),
                "--rate", str(args.rate), "--arrival", "custom", "--workload", workload,
                "--tp-prefill", "1", "--pp-prefill", "1", "--tp-decode", "1", "--pp-decode", "1"]
        spec = {"checkout": checkout, "argv": argv, "repeats": args.repeats, "cpu": args.cpu}
        spec_file = os.path.join(d, "spec.json")
        with open(spec_file, "w") as f:
            json.dump(spec, f)
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(Path(__file__).resolve().parents[2]),
                                                        env.get("PYTHONPATH")) if p)
        proc = subprocess.run([sys.executable, "-m", "experiments.bench.simulator", "--simdistserve-child", spec_file],
                              env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"simdistserve failed (exit {proc.returncode}):\n{proc.stderr[-4000:]}")
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    result.update(simulator="simdistserve", model=SIMDISTSERVE_MODEL, engine=args.engine, backend=backend,
                  argv=["python", "-m", "simdistserve.benchmarks.simulate_dist",
                        *(a if a != workload else "WORKLOAD.json" for a in argv)])
    return result


class _SimulationDone(Exception):
    """Raised by the wrapped `env.run()` once it returns, to skip simulate_dist's analysis."""


def simdistserve_child(spec_file: str) -> None:
    """In the child: import simdistserve, wrap its arrival queueing and event loop with timers, run `main`."""
    with open(spec_file) as f:
        spec = json.load(f)
    if spec["cpu"] is not None:
        os.sched_setaffinity(0, {spec["cpu"]})
    sys.path.insert(0, spec["checkout"])
    t0 = time.perf_counter()
    import simpy
    from simdistserve.benchmarks import simulate_dist as sd

    import_s = time.perf_counter() - t0

    state: dict[str, Any] = {}
    put = sd.put_requests_with_interarrivals
    env_run = simpy.Environment.run

    def timed_put(env, scheduler, inter_arrivals, requests):
        state["requests"] = requests
        state["sim_start"] = time.perf_counter()
        return put(env, scheduler, inter_arrivals, requests)

    def timed_run(self, until=None):
        out = env_run(self, until)
        state["sim_end"] = time.perf_counter()
        state["now_ms"] = self.now
        raise _SimulationDone(out)

    # clusters are built inside main; their `run` (which starts the worker processes) hands us the workers
    for cls in (sd.VLLMCluster, sd.DisaggCluster):
        def cluster_run(self, _orig=cls.run):
            state["cluster"] = self
            return _orig(self)
        cls.run = cluster_run
    sd.put_requests_with_interarrivals = timed_put
    simpy.Environment.run = timed_run

    args = sd.parse_args(spec["argv"])
    runs = []
    for _ in range(spec["repeats"]):
        state.clear()
        gc.collect()
        t0 = time.perf_counter()
        try:
            sd.main(args)
            raise RuntimeError("simulate_dist.main returned without running the simulation")
        except _SimulationDone:
            pass
        requests = state["requests"]
        logs = [w.log for w in state["cluster"].get_all_workers()]
        runs.append({
            "wall_s": state["sim_end"] - state["sim_start"],
            "setup_s": state["sim_start"] - t0,
            "finished": sum(1 for r in requests if r.should_finish()),
            "makespan_s": state["now_ms"] / 1000.0,  # simdistserve's clock is in ms
            "iterations": sum(1 for log in logs for e in log if e[1] in ("do_prefill", "do_decode")),
        })
        state.clear()
        del requests, logs
    print(json.dumps({"import_s": import_s, "simpy": getattr(simpy, "__version__", None),
                      "commit": _git_commit(spec["checkout"]), "runs": runs}))


# ---------------------------------------------------------------------------- report


def summarize(result: dict[str, Any], n: int) -> None:
    walls = [r["wall_s"] for r in result["runs"]]
    result["wall_s_min"], result["wall_s_median"] = min(walls), statistics.median(walls)
    result["requests"] = n
    result["finished"] = result["runs"][-1]["finished"]
    result["sim_req_per_s"] = n / result["wall_s_min"]
    result["sim_req_per_s_median"] = n / result["wall_s_median"]
    iterations = result["runs"][-1]["iterations"]  # the same every repeat: both simulators are deterministic
    result["us_per_iteration"] = 1e6 * result["wall_s_min"] / iterations if iterations else None


def table(results: list[dict[str, Any]], rate: float) -> str:
    base = next((r for r in results if r["simulator"] == "simdistserve"), None)
    head = ["simulator", "model", "requests", "rate", "wall s (min/median)", "simulated req/s",
            "ratio ours/simdistserve"]
    rows = []
    for r in results:
        ratio = (f"{r['sim_req_per_s'] / base['sim_req_per_s']:.2f}x"
                 if base is not None and r["simulator"] == "ours" else "-")
        rows.append([r["simulator"], r["model"], str(r["requests"]), f"{rate:g}",
                     f"{r['wall_s_min']:.3f} / {r['wall_s_median']:.3f}", f"{r['sim_req_per_s']:,.0f}", ratio])
    widths = [max(len(x) for x in col) for col in zip(head, *rows)]
    lines = ["  ".join(x.ljust(w) for x, w in zip(line, widths)) for line in [head, *rows]]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def _git_commit(path: str) -> Optional[str]:
    try:
        return subprocess.run(["git", "-C", path, "rev-parse", "HEAD"], capture_output=True, text=True,
                              timeout=10, check=True).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None


def environment(cpu: Optional[int]) -> dict[str, Any]:
    from experiments.sweep import provenance

    return {**provenance.machine(), "pinned_core": cpu, "load_avg": os.getloadavg(),
            "git_commit": _git_commit(str(Path(__file__).resolve().parents[2]))}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--requests", type=int, default=10000)
    p.add_argument("--rate", type=float, default=DEFAULT_RATE, help="Poisson arrival rate, requests/s")
    p.add_argument("--seed", type=int, default=0, help="workload and arrival seed")
    p.add_argument("--engine", choices=("unified", "disagg", "semipd"), default="unified")
    p.add_argument("--model", default="llama3-8b", help="our simulator's model shape")
    p.add_argument("--hardware", default="a100-80g", help="our simulator's GPU preset")
    p.add_argument("--max-num-seqs", type=int, default=256)
    p.add_argument("--max-num-batched-tokens", type=int, default=8192)
    p.add_argument("--prefill-share", type=int, default=50, help="semipd: prefill compute share, percent")
    p.add_argument("--decode-share", type=int, default=50, help="semipd: decode compute share, percent")
    p.add_argument("--no-fast-forward", action="store_true", help="ours: step every decode iteration")
    p.add_argument("--no-prefix-caching", action="store_true",
                   help="ours: engine.enable_prefix_caching=false (no request of this workload shares a prefix; "
                        "a preempted one may still find its own blocks with it on)")
    p.add_argument("--simdistserve", metavar="PATH", default=None,
                   help="root of a DistServe checkout; without it, ours runs alone")
    p.add_argument("--cpu", type=int, default=None, help="pin to this core (os.sched_setaffinity)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--preset", default=None, metavar="EXPERIMENT",
                   help="time `python run.py experiment=EXPERIMENT` as a whole instead (e.g. paper_llama3_8b_sharegpt)")
    p.add_argument("--baseline", default=None, metavar="DIR",
                   help="with --preset: another checkout of this project timed beside this one, alternated")
    p.add_argument("--out", default=None, help="write the results as JSON")
    args = p.parse_args(argv)
    if args.requests < 1 or args.repeats < 1:
        p.error("--requests and --repeats must be >= 1")
    if args.rate <= 0:
        p.error("--rate must be > 0")
    return args


def time_preset(args) -> dict[str, Any]:
    """`--preset NAME`: the wall time of `python run.py experiment=NAME` as a user runs it (every job, the sweep's
    aggregation, figures and W&B summary run), here and, with `--baseline DIR`, in another checkout of this
    project (say the previous commit), alternated `--repeats` times; their points.csv (a goodput preset: goodput.csv)
    compared (`points_identical`)."""
    here = Path(__file__).resolve().parents[2]
    trees = {"this": here, **({"baseline": Path(args.baseline).resolve()} if args.baseline else {})}
    runs: dict[str, list[float]] = {k: [] for k in trees}
    points: dict[str, dict[str, str]] = {}
    with tempfile.TemporaryDirectory() as d:
        for rep in range(args.repeats):
            for name, tree in trees.items():
                sweep = Path(d) / f"{name}-{rep}"
                cmd = [sys.executable, "run.py", f"experiment={args.preset}", f"hydra.sweep.dir={sweep}"]
                t0 = time.perf_counter()
                proc = subprocess.run(cmd, cwd=tree, capture_output=True, text=True)
                wall = time.perf_counter() - t0
                if proc.returncode:
                    raise SystemExit(f"{name} ({tree}): run.py failed:\n{proc.stderr[-3000:]}")
                runs[name].append(wall)
                for table in ("points.csv", "goodput.csv"):  # a rate sweep's; a goodput search's
                    if (sweep / table).is_file():
                        points.setdefault(name, {})[table] = (sweep / table).read_text()
                print(f"{name}: {wall:.1f} s", flush=True)
    out = {"preset": args.preset, "repeats": args.repeats, "environment": environment(None),
           "trees": {k: str(v) for k, v in trees.items()},
           "wall_s": {k: {"min": min(v), "median": statistics.median(v), "max": max(v), "runs": v}
                      for k, v in runs.items()}}
    if "baseline" in runs:
        out["points_identical"] = points.get("this") == points.get("baseline")
        out["baseline_commit"] = _git_commit(str(trees["baseline"]))
    for k, v in out["wall_s"].items():
        print(f"{args.preset} [{k}]: wall min / median / max {v['min']:.1f} / {v['median']:.1f} / {v['max']:.1f} s")
    if "points_identical" in out:
        print(f"{', '.join(points.get('this', {})) or 'no table'} identical to the baseline's: "
              f"{out['points_identical']}")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(out, f, indent=2)
    return out


def main(argv=None) -> dict[str, Any]:
    args = parse_args(argv)
    if args.preset:
        return time_preset(args)
    if args.cpu is not None:
        os.sched_setaffinity(0, {args.cpu})
    arrivals, prompt_lens, output_lens = make_workload(args.requests, args.rate, args.seed)
    n = len(arrivals)
    results = [run_ours(args, arrivals, prompt_lens, output_lens)]
    notes = []
    if args.simdistserve:
        if args.engine in SIMDISTSERVE_BACKEND:
            results.append(run_simdistserve(args, arrivals, prompt_lens, output_lens))
        else:
            notes.append(f"simdistserve has no counterpart of --engine {args.engine}; ours ran alone")
    for r in results:
        summarize(r, n)
        if r["finished"] != n:
            notes.append(f"{r['simulator']}: {r['finished']} of {n} requests finished")
    if len(results) == 2:
        results[0]["ratio_vs_simdistserve"] = results[0]["sim_req_per_s"] / results[1]["sim_req_per_s"]
    out = {"requests": n, "rate": args.rate, "seed": args.seed, "engine": args.engine, "repeats": args.repeats,
           "workload": {"name": "synthetic", "arrival": "poisson",
                        "mean_prompt_len": sum(prompt_lens) / n, "mean_output_len": sum(output_lens) / n},
           "environment": environment(args.cpu), "results": results, "notes": notes}
    print(table(results, args.rate))
    for note in notes:
        print("note:", note)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(out, f, indent=2)
    return out


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--simdistserve-child":
        simdistserve_child(sys.argv[2])
    else:
        main()
