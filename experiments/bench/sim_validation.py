"""Validate the simulator against the real engine on this machine, before trusting it at GPU scale.

    python -m experiments.bench.sim_validation --model tiny --requests 150 --rate 6 --out results/validation/tiny
    python -m experiments.bench.sim_validation --model llama-100m --requests 80 --rate 1.5 --length-scale 0.25 \
        --kv-cache-mb 3072 --out results/validation/llama-100m

1. Profile: `python -m semipd_engine.sim.profile` measures the real model runner on this machine (skipped with
   --profile FILE). Calibration (--calibrate, on by default for a new profile): two real runs of the unified
   engine on held-out requests (the same kind of workload, another seed, a low and a higher rate) measure what
   the serving stack adds on this machine (server, IPC, streaming, client: per iteration, per streamed token,
   per request); the fit is written into the profile's `serving` block and is the same for every engine.
2. For each engine (unified, unified_chunked, disagg, semi-PD at two partitions, semipd_dynamic) the same workload
   (same seed, lengths and arrival schedule) runs twice through `run.py`'s job pipeline: on the real engine
   (server, worker processes, load generator over HTTP) and on the simulated backend with the `profile` cost
   model.
3. Prints P50/P90 TTFT, TPOT and E2E of both and the relative error sim/real - 1, and writes validation.json and
   validation.md into --out.

Run it on a quiet machine: the real side is measured in wall time (its jobs record host interference).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ENGINES = [  # (label, overrides)
    ("unified", ["engine=unified"]),
    ("unified_chunked", ["engine=unified_chunked"]),
    ("disagg", ["engine=disagg"]),
    ("semipd_50_50", ["engine=semipd", "engine.prefill_share=50", "engine.decode_share=50"]),
    ("semipd_100_50", ["engine=semipd", "engine.prefill_share=100", "engine.decode_share=50"]),
    ("semipd_dynamic", ["engine=semipd_dynamic"]),
]
METRICS = [("ttft_s", "p50"), ("ttft_s", "p90"), ("tpot_s", "p50"), ("tpot_s", "p90"), ("e2e_s", "p50"),
           ("e2e_s", "p90")]


def run_job(overrides: list[str], job_dir: Path):
    from hydra import compose, initialize_config_dir

    from experiments.sweep import conf_store
    from experiments.sweep.job import run

    conf_store.register()
    with initialize_config_dir(config_dir=conf_store.CONF_DIR, version_base=None):
        cfg = compose("config", overrides=overrides)
    from experiments.loadgen.result import RunResult

    run(cfg, str(job_dir))
    return RunResult.load(job_dir)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="tiny")
    ap.add_argument("--dtype", default="auto", help="auto (bfloat16 where this CPU has it natively, else float32)")
    ap.add_argument("--requests", type=int, default=150)
    ap.add_argument("--rate", type=float, default=6.0)
    ap.add_argument("--length-scale", type=float, default=1.0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--profile", default=None, help="an existing profile file (else one is measured)")
    ap.add_argument("--engines", default=None, help="comma-separated labels to run (default: all)")
    ap.add_argument("--calibrate", action="store_true", help="(re)measure the serving overhead into the profile")
    ap.add_argument("--calibration-rates", default="2,6", help="two request rates of the calibration runs")
    ap.add_argument("--kv-cache-mb", type=int, default=512, help="the profile's KV pool (llama-100m needs ~3072)")
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    from semipd_engine.model.dtype import choose, describe

    choice = choose(args.dtype)  # once, so the profile, the replay and the report name one concrete dtype
    print(describe(choice))
    args.dtype = choice.dtype
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("WANDB_MODE", "disabled")
    profile = args.profile or str(out / f"profile_{args.model}.json")
    if not args.profile:
        subprocess.run([sys.executable, "-m", "semipd_engine.sim.profile", "--model", args.model, "--dtype",
                        args.dtype, "--kv-cache-mb", str(args.kv_cache_mb), "--out", profile], check=True)
    if args.calibrate or not args.profile:
        held_out = ["workload=synthetic", f"workload.num_requests={args.requests}", f"workload.seed={1000 + args.seed}",
                    f"workload.length_scale={args.length_scale}"]
        calibrate(profile, args.model, args.dtype, out / "calibration", args.calibration_rates, held_out)
    common = ["experiment=single", f"model={args.model}", f"model.dtype={args.dtype}", "workload=synthetic",
              f"workload.num_requests={args.requests}", f"workload.rate={args.rate}", f"workload.seed={args.seed}",
              f"workload.length_scale={args.length_scale}", "slo=default", "experiment.skip_finished=false",
              "loadgen.progress=false"]
    sim = ["backend=sim", "backend.cost_model=profile", f"backend.profile_path={profile}", "hardware=cpu"]
    wanted = set(args.engines.split(",")) if args.engines else None
    load_s = args.requests / args.rate  # iterations compared while requests arrive, not in the drain after
    rows = []
    for label, overrides in ENGINES:
        if wanted and label not in wanted:
            continue
        jd = out / label.replace("(", "_").replace(")", "").replace(",", "_")
        t0 = time.time()
        real = run_job(common + overrides, jd / "real").aggregates
        t1 = time.time()
        simulated = run_job(common + overrides + sim, jd / "sim").aggregates
        row = {"engine": label, "real_wall_s": t1 - t0, "sim_wall_s": time.time() - t1,
               **iteration_times(jd / "real", "real", load_s), **iteration_times(jd / "sim", "sim", load_s)}
        for m, q in METRICS:
            r, s = getattr(real.latency(m), q), getattr(simulated.latency(m), q)
            row[f"real_{q}_{m}"], row[f"sim_{q}_{m}"] = r, s
            row[f"err_{q}_{m}"] = (s / r - 1) if r and s is not None else None
        rows.append(row)
        print(format_row(row), flush=True)
    result = {"model": args.model, "dtype": args.dtype, "requests": args.requests, "rate": args.rate,
              "length_scale": args.length_scale, "seed": args.seed, "profile": profile, "rows": rows,
              "command": "python -m experiments.bench.sim_validation " + " ".join(sys.argv[1:])}
    (out / "validation.json").write_text(json.dumps(result, indent=2))
    (out / "validation.md").write_text(markdown(result))
    print(markdown(result))


def iteration_times(job_dir: Path, side: str, load_s: float) -> dict:
    """Mean iteration time per phase while the load arrived (each iteration counted once): where a latency error
    comes from, the iterations themselves or what happens between and around them."""
    from experiments.analysis.server_metrics import iteration_means

    return {f"{side}_mean_iteration_time_s_{ph}": v for ph, v in iteration_means(job_dir, 0.0, load_s).items()}


def calibrate(profile: str, model: str, dtype: str, out: Path, rates: str, workload: list[str]) -> dict:
    """Fit the serving stack's overhead (fixed_s + per_token_s x tokens per iteration; request_s per request).

    Calibration replays the validation's kind of workload (same lengths) with another seed (1000 + the
    validation seed), at two rates, on the unified engine only: held-out data, one shared pair of constants.
    """
    lo, hi = (float(r) for r in rates.split(","))
    base = ["experiment=single", "engine=unified", f"model={model}", f"model.dtype={dtype}", "slo=default",
            "experiment.skip_finished=false", "loadgen.progress=false", *workload]
    runs = {rate: [*base, f"workload.rate={rate}"] for rate in (lo, hi)}
    real = {rate: run_job(o, out / f"real_rate{rate}").aggregates for rate, o in runs.items()}
    sim = ["backend=sim", "backend.cost_model=profile", f"backend.profile_path={profile}", "hardware=cpu"]
    data = json.loads(Path(profile).read_text())
    data["serving"] = {"fixed_s": 0.0, "per_token_s": 0.0, "request_s": 0.0}
    Path(profile).write_text(json.dumps(data, indent=1))
    fit = {}
    for it in range(4):  # overheads feed back into batching and queueing: refine a few times
        simmed = {rate: run_job(o + sim, out / f"sim{it}_rate{rate}") for rate, o in runs.items()}
        # tokens streamed per iteration, from the simulation at the current fit
        per_iter = {rate: s.aggregates.output_token_throughput * s.aggregates.duration_s
                    / max(1, s.backend["iterations"]) for rate, s in simmed.items()}
        gap = {rate: real[rate].tpot_s.p50 - simmed[rate].aggregates.tpot_s.p50 for rate in runs}
        # fixed + per_token * tokens_per_iteration closes the TPOT gap at both rates (a correction to the
        # current fit: it may go down as well as up; the constants themselves stay >= 0)
        db = (gap[hi] - gap[lo]) / (per_iter[hi] - per_iter[lo]) if per_iter[hi] != per_iter[lo] else 0.0
        da = gap[lo] - db * per_iter[lo]
        if it:  # damped after the first step: overheads feed back into batch sizes, which moves the gaps
            da, db = da / 2, db / 2
        s_ = data["serving"]
        s_["per_token_s"] = max(0.0, s_["per_token_s"] + db)
        s_["fixed_s"] = max(0.0, s_["fixed_s"] + da)
        s_["request_s"] = max(0.0, s_["request_s"] + real[lo].ttft_s.p50 - simmed[lo].aggregates.ttft_s.p50)
        Path(profile).write_text(json.dumps(data, indent=1))
        fit = {**s_, "iteration": it, "tokens_per_iteration": per_iter, "tpot_gap_s": gap}
        print("calibration:", json.dumps(fit), flush=True)
    data["serving"]["calibration"] = {"rates": [lo, hi], "workload": workload,
                                      "real_tpot_p50_s": {str(r): real[r].tpot_s.p50 for r in runs},
                                      "real_ttft_p50_s": {str(r): real[r].ttft_s.p50 for r in runs}}
    Path(profile).write_text(json.dumps(data, indent=1))
    return fit


def format_row(row: dict) -> str:
    errs = " ".join(f"{q}_{m[:-2]} {100 * row[f'err_{q}_{m}']:+.1f}%" for m, q in METRICS
                    if row[f"err_{q}_{m}"] is not None)
    for ph in ("prefill", "decode"):
        r, s = row.get(f"real_mean_iteration_time_s_{ph}"), row.get(f"sim_mean_iteration_time_s_{ph}")
        if r and s:
            errs += f" | {ph} iteration {1e3 * r:.0f} / {1e3 * s:.0f} ms"
    return f"{row['engine']:>16}: {errs}"


def markdown(result: dict) -> str:
    head = "| engine | " + " | ".join(f"{q.upper()} {m[:-2].upper()} real / sim (err)" for m, q in METRICS) + " |"
    lines = [head, "|" + "---|" * (len(METRICS) + 1)]
    for row in result["rows"]:
        cells = []
        for m, q in METRICS:
            r, s, e = row[f"real_{q}_{m}"], row[f"sim_{q}_{m}"], row[f"err_{q}_{m}"]
            cells.append(f"{1e3 * r:.1f} / {1e3 * s:.1f} ms ({100 * e:+.1f}%)" if e is not None else "n/a")
        lines.append(f"| {row['engine']} | " + " | ".join(cells) + " |")
    errs = [abs(row[k]) for row in result["rows"] for k in row if k.startswith("err_") and row[k] is not None]
    if errs:
        errs.sort()
        lines.append("")
        lines.append(f"median |error| {100 * errs[len(errs) // 2]:.1f}%, max {100 * errs[-1]:.1f}% "
                     f"over {len(errs)} figures")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
