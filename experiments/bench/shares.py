"""semi-PD throughput at static partitions, measured interleaved on one server.

    python -m experiments.bench.shares [--model tiny] [--rounds 3] [--requests 48] [--concurrency 8]
        [--partitions 100:100,100:50,50:100,50:50] [--backend auto|cpu_quota|cpu_affinity] [--out FILE]

One semi-PD server; for each round, each partition in turn is applied (`POST /partition`)
and a closed-loop load (fixed prompts, ignore_eos) runs to completion; the result is
output tokens per second of wall time, and each worker's mean iteration time over the run
(from the server's `iteration_time_seconds` histogram): how fast a phase runs under its share.
Interleaving the partitions within each round keeps a drifting machine (other load, thermal)
from favouring one of them.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import tempfile
import time
import urllib.request

import aiohttp

from experiments.bench.common import emit, scrape_metrics


def _post(url: str, body: dict) -> dict:
    req = urllib.request.Request(url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=30) as r:
        return json.loads(r.read())


async def _load(url: str, requests: int, concurrency: int, prompt_len: int, output_len: int) -> tuple[int, float]:
    body = {"max_tokens": output_len, "temperature": 0, "ignore_eos": True}
    left = list(range(requests))
    tokens = 0

    async def client(session):
        nonlocal tokens
        while left:
            i = left.pop()
            prompt = [10 + (7 * i + j) % 3000 for j in range(prompt_len)]
            async with session.post(url + "/v1/completions", json={**body, "prompt": prompt}) as r:
                out = await r.json()
                assert r.status == 200, out
                tokens += out["usage"]["completion_tokens"]

    async with aiohttp.ClientSession() as session:
        t0 = time.monotonic()
        await asyncio.gather(*(client(session) for _ in range(concurrency)))
        return tokens, time.monotonic() - t0


def iteration_times(samples: dict[str, float]) -> dict[str, tuple[float, float]]:
    """instance -> (seconds, iterations) summed over phases, from the iteration-time histogram."""
    out: dict[str, list[float]] = {}
    for key, v in samples.items():
        for field, i in (("iteration_time_seconds_sum{", 0), ("iteration_time_seconds_count{", 1)):
            if key.startswith(field):
                inst = key.split('instance="', 1)[1].split('"', 1)[0]
                out.setdefault(inst, [0.0, 0.0])[i] += v
    return {k: (v[0], v[1]) for k, v in out.items()}


def _mean_ms(before: dict, after: dict, inst: str) -> float | None:
    s0, n0 = before.get(inst, (0.0, 0.0))
    s1, n1 = after.get(inst, (0.0, 0.0))
    return round(1e3 * (s1 - s0) / (n1 - n0), 2) if n1 > n0 else None


def _median(runs: list[dict], key: str) -> float | None:
    vals = [run[key] for run in runs if run[key] is not None]
    return round(statistics.median(vals), 2) if vals else None


def measure(model: str, partitions: list[tuple[int, int]], rounds: int = 3, requests: int = 48,
            concurrency: int = 8, prompt_len: int = 64, output_len: int = 64, backend: str = "auto") -> dict:
    from experiments.sweep.launch import EngineServer
    from semipd_engine.config import EngineConfig, ModelConfig, ServerConfig, freeze

    ecfg = freeze(EngineConfig, {"name": "semipd", "prefill_share": 50, "decode_share": 50,
                                 "max_num_batched_tokens": 512, "partition_backend": backend})
    runs = []
    with tempfile.TemporaryDirectory() as d, \
            EngineServer(freeze(ModelConfig, {"name": model}), ecfg, freeze(ServerConfig, {}), d) as srv:
        asyncio.run(_load(srv.url, concurrency, concurrency, prompt_len, 8))  # warm-up
        for r in range(rounds):
            for x, y in partitions:
                desc = _post(srv.url + "/partition", {"prefill_share": x, "decode_share": y})
                time.sleep(0.2)  # applied at the workers' next iteration boundary
                before = iteration_times(scrape_metrics(srv.url))
                tokens, seconds = asyncio.run(_load(srv.url, requests, concurrency, prompt_len, output_len))
                after = iteration_times(scrape_metrics(srv.url))
                runs.append({"round": r, "partition": [x, y], "tokens": tokens, "seconds": round(seconds, 3),
                             "tokens_per_s": round(tokens / seconds, 1),
                             "prefill_iteration_ms": _mean_ms(before, after, "prefill"),
                             "decode_iteration_ms": _mean_ms(before, after, "decode"),
                             "backend": desc.get("backend"),
                             "threads": [desc.get("prefill_threads"), desc.get("decode_threads")],
                             "cores": [desc.get("prefill_cores"), desc.get("decode_cores")],
                             "quota_cpus": [desc.get("prefill_quota_cpus"), desc.get("decode_quota_cpus")]})
    summary = []
    for x, y in partitions:
        mine = [run for run in runs if run["partition"] == [x, y]]
        tps = [run["tokens_per_s"] for run in mine]

        summary.append({"partition": [x, y], "tokens_per_s": round(statistics.median(tps), 1), "runs": tps,
                        "prefill_iteration_ms": _median(mine, "prefill_iteration_ms"),
                        "decode_iteration_ms": _median(mine, "decode_iteration_ms"),
                        "prefill_iteration_ms_runs": [run["prefill_iteration_ms"] for run in mine],
                        "decode_iteration_ms_runs": [run["decode_iteration_ms"] for run in mine]})
    return {"model": model, "backend": runs[0]["backend"] if runs else backend, "requests": requests, "concurrency": concurrency, "prompt_len": prompt_len,
            "output_len": output_len, "summary": summary, "runs": runs}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="tiny")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--requests", type=int, default=48)
    ap.add_argument("--concurrency", type=int, default=8)
    ap.add_argument("--prompt-len", type=int, default=64)
    ap.add_argument("--output-len", type=int, default=64)
    ap.add_argument("--partitions", default="100:100,100:50,50:100,50:50")
    ap.add_argument("--backend", default="auto", help="engine.partition_backend: auto, cpu_quota, cpu_affinity")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    parts = [tuple(int(v) for v in p.split(":")) for p in args.partitions.split(",")]
    emit(measure(args.model, parts, args.rounds, args.requests, args.concurrency, args.prompt_len,
                 args.output_len, args.backend), args.out)


if __name__ == "__main__":
    main()
