"""semi-PD throughput at static partitions, measured interleaved on one server.

    python -m experiments.bench.shares [--model tiny] [--rounds 3] [--requests 48] [--concurrency 8]
        [--partitions 100:100,100:50,50:100,50:50] [--out FILE]

One semi-PD server; for each round, each partition in turn is applied (`POST /partition`)
and a closed-loop load (fixed prompts, ignore_eos) runs to completion; the result is
output tokens per second of wall time. Interleaving the partitions within each round
keeps a drifting machine (other load, thermal) from favouring one of them.
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

from experiments.bench.common import emit


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


def measure(model: str, partitions: list[tuple[int, int]], rounds: int = 3, requests: int = 48,
            concurrency: int = 8, prompt_len: int = 64, output_len: int = 64) -> dict:
    from experiments.sweep.launch import EngineServer
    from semipd_engine.config import EngineConfig, ModelConfig, ServerConfig, freeze

    ecfg = freeze(EngineConfig, {"name": "semipd", "prefill_share": 50, "decode_share": 50,
                                 "max_num_batched_tokens": 512})
    runs = []
    with tempfile.TemporaryDirectory() as d, \
            EngineServer(freeze(ModelConfig, {"name": model}), ecfg, freeze(ServerConfig, {}), d) as srv:
        asyncio.run(_load(srv.url, concurrency, concurrency, prompt_len, 8))  # warm-up
        for r in range(rounds):
            for x, y in partitions:
                desc = _post(srv.url + "/partition", {"prefill_share": x, "decode_share": y})
                time.sleep(0.2)  # applied at the workers' next iteration boundary
                tokens, seconds = asyncio.run(_load(srv.url, requests, concurrency, prompt_len, output_len))
                runs.append({"round": r, "partition": [x, y], "tokens": tokens, "seconds": round(seconds, 3),
                             "tokens_per_s": round(tokens / seconds, 1),
                             "threads": [desc.get("prefill_threads"), desc.get("decode_threads")],
                             "cores": [desc.get("prefill_cores"), desc.get("decode_cores")]})
    summary = []
    for x, y in partitions:
        tps = [run["tokens_per_s"] for run in runs if run["partition"] == [x, y]]
        summary.append({"partition": [x, y], "tokens_per_s": round(statistics.median(tps), 1), "runs": tps})
    return {"model": model, "requests": requests, "concurrency": concurrency, "prompt_len": prompt_len,
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
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    parts = [tuple(int(v) for v in p.split(":")) for p in args.partitions.split(",")]
    emit(measure(args.model, parts, args.rounds, args.requests, args.concurrency, args.prompt_len,
                 args.output_len), args.out)


if __name__ == "__main__":
    main()
