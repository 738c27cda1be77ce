"""The chat endpoint against the completions endpoint, measured by the load generator on one server.

    python -m experiments.bench.endpoints [--model tiny] [--engine unified] [--rounds 3] [--requests 40]
        [--rate 4] [--prompt-len 128] [--output-len 32] [--out FILE]

One server; in each round the same workload (same seed: same lengths and arrival times) runs once through
`/v1/completions` and once through `/v1/chat/completions` (`loadgen.endpoint=chat`, each prompt one user
message of the same token length *under the chat template*), the order alternating between rounds so a drifting
machine favours neither. Reported per endpoint: the median over rounds of each run's mean and P90 TTFT and
TPOT, every run's values, the prompt tokens the server counted, and whether each run's self-check passed.
What differs is only what each endpoint costs the server (message validation, the chat template): within noise,
the two should measure the same engine.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile

from experiments.bench.common import emit


def measure(model: str, engine: str, rounds: int, requests: int, rate: float, prompt_len: int,
            output_len: int) -> dict:
    from experiments.loadgen.client import run_loadgen
    from experiments.sweep.config import LoadgenConfig, SLOConfig, WorkloadConfig
    from experiments.sweep.launch import EngineServer
    from semipd_engine.config import EngineConfig, ModelConfig, ServerConfig, freeze

    wl = freeze(WorkloadConfig, {"name": "fixed", "prompt_len": prompt_len, "output_len": output_len,
                                 "num_requests": requests, "arrival": "poisson", "rate": rate, "seed": 0})
    slo = freeze(SLOConfig, {})
    runs = []
    with tempfile.TemporaryDirectory() as d, \
            EngineServer(freeze(ModelConfig, {"name": model}), freeze(EngineConfig, {"name": engine}),
                         freeze(ServerConfig, {}), d) as srv:
        for r in range(rounds):
            order = ("completions", "chat") if r % 2 == 0 else ("chat", "completions")
            for endpoint in order:
                lc = freeze(LoadgenConfig, {"base_url": srv.url, "progress": False, "endpoint": endpoint,
                                            "warmup_requests": 5})
                s = run_loadgen(lc, wl, slo)
                a = s.aggregates
                runs.append({"round": r, "endpoint": endpoint, "valid": s.self_check["valid"],
                             "ok": a.num_ok, "mismatched_prompts": s.length_mismatch["prompt_mismatched"],
                             **{f"{q}_{m}_ms": round(1e3 * getattr(a.latency(m), q), 2) for m in ("ttft_s", "tpot_s")
                                for q in ("mean", "p90")}})
    summary = {}
    for endpoint in ("completions", "chat"):
        mine = [x for x in runs if x["endpoint"] == endpoint]
        summary[endpoint] = {k: round(statistics.median(x[k] for x in mine), 2)
                             for k in ("mean_ttft_s_ms", "p90_ttft_s_ms", "mean_tpot_s_ms", "p90_tpot_s_ms")}
        summary[endpoint]["all_valid"] = all(x["valid"] for x in mine)
    return {"model": model, "engine": engine, "rate": rate, "requests": requests, "prompt_len": prompt_len,
            "output_len": output_len, "summary": summary, "runs": runs}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="tiny")
    ap.add_argument("--engine", default="unified")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--requests", type=int, default=40)
    ap.add_argument("--rate", type=float, default=4.0)
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--output-len", type=int, default=32)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    emit(measure(args.model, args.engine, args.rounds, args.requests, args.rate, args.prompt_len, args.output_len),
         args.out)


if __name__ == "__main__":
    main()
