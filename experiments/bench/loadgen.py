"""How fast can the load generator drive a server, and how much does it add to TTFT?

    python -m experiments.bench.loadgen [--rates 100,200,400,600,800,1000] [--seconds 5]

A trivial streaming server (32 tokens, no model, no delay) runs in its own
process and records when it received each request and wrote its first token.
The client's added TTFT is its measured TTFT minus the server's own
(first write - receipt), i.e. connection, transport and client-side parsing.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np

CHUNK = json.dumps({"id": "x", "object": "text_completion",
                    "choices": [{"index": 0, "text": "tok ", "finish_reason": None}]})


def serve(port: int, record_path: str) -> None:
    from aiohttp import web

    log: list[tuple[float, float]] = []

    async def models(request):
        return web.json_response({"data": [{"id": "trivial"}]})

    async def completions(request):
        t_recv = time.monotonic()
        body = await request.json()
        n = body.get("max_tokens", 32)
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        first = None
        for _ in range(n):
            await resp.write(f"data: {CHUNK}\n\n".encode())
            first = first or time.monotonic()
        usage = {"prompt_tokens": 4, "completion_tokens": n, "total_tokens": n + 4}
        await resp.write(f"data: {json.dumps({'choices': [], 'usage': usage})}\n\ndata: [DONE]\n\n".encode())
        log.append((t_recv, first))
        return resp

    async def main():
        app = web.Application()
        app.add_routes([web.get("/v1/models", models), web.post("/v1/completions", completions)])
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", port).start()
        stop = asyncio.Event()
        asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
        await stop.wait()
        with open(record_path, "w") as f:
            json.dump(log, f)
        await runner.cleanup()

    asyncio.run(main())


def run_point(url: str, rate: float, seconds: float) -> dict:
    from experiments.loadgen import run_loadgen
    from experiments.sweep.config import LoadgenConfig, SLOConfig, WorkloadConfig
    from semipd_engine.config import freeze

    n = max(50, int(rate * seconds))
    lcfg = freeze(LoadgenConfig, {"base_url": url, "progress": False, "tokenizer": "none",
                                  "prewarm_connections": 64})
    wcfg = freeze(WorkloadConfig, {"name": "fixed", "prompt_len": 4, "output_len": 32, "num_requests": n,
                                   "arrival": "poisson", "rate": rate, "seed": 1})
    s = run_loadgen(lcfg, wcfg, freeze(SLOConfig, {}))
    c, a = s.self_check, s.aggregates
    return {"rate": rate, "requests": n, "achieved_rate": c.get("achieved_rate"),
            "scheduled_rate": c.get("scheduled_rate"), "lateness_p99_ms": 1e3 * c["dispatch_lateness_p99_s"],
            "loop_lag_p99_ms": 1e3 * (c["event_loop_lag_p99_s"] or 0), "errors": a.num_errors,
            "ttft_from_send_p50_ms": 1e3 * a.ttft_from_send_s.p50, "valid": c["valid"], "t0": s.t0_monotonic}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--rates", default="50,100,200,400,600,800,1000")
    ap.add_argument("--seconds", type=float, default=5.0)
    ap.add_argument("--serve", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--record", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    if args.serve:
        os.sched_setaffinity(0, {1 % os.cpu_count()})  # server on its own core, client on the other
        return serve(args.serve, args.record)
    from experiments.sweep.launch import free_port

    os.sched_setaffinity(0, {0})
    port = free_port()
    record = f"/tmp/bench-loadgen-{port}.json"
    srv = subprocess.Popen([sys.executable, "-m", "experiments.bench.loadgen", "--serve", str(port),
                            "--record", record])
    time.sleep(2.0)
    url = f"http://127.0.0.1:{port}"
    results = []
    try:
        low = run_point(url, 20, 5)  # low load: client-added TTFT
        for rate in [float(r) for r in args.rates.split(",")]:
            r = run_point(url, rate, args.seconds)
            results.append(r)
            print(json.dumps({k: v for k, v in r.items() if k != "t0"}))
    finally:
        srv.send_signal(signal.SIGTERM)
        srv.wait(30)
    log = np.array(json.load(open(record)))
    server_ttft = log[:, 1] - log[:, 0]
    ok = [r for r in results if r["valid"] and r["lateness_p99_ms"] <= 2.0 and r["errors"] == 0]
    summary = {
        "client_ttft_from_send_p50_ms_at_20rps": low["ttft_from_send_p50_ms"],
        "server_ttft_p50_ms": 1e3 * float(np.median(server_ttft[:100])),
        "max_valid_rate_with_p99_lateness_le_2ms": max((r["rate"] for r in ok), default=None),
        "points": results,
    }
    summary["client_added_ttft_ms"] = summary["client_ttft_from_send_p50_ms_at_20rps"] - summary["server_ttft_p50_ms"]
    print(json.dumps({k: v for k, v in summary.items() if k != "points"}, indent=2))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(summary, f, indent=2)


if __name__ == "__main__":
    main()
