"""What disaggregation costs: KV transfer and memory, measured against semi-PD on the same load.

    python -m experiments.bench.disagg [--rate 6] [--requests 120] [--model tiny]

For `disagg` (1P1D) and `semipd` (50/50) in turn: start the server, replay the
synthetic ShareGPT-like workload, then read /metrics: bytes and time of the KV
transfers (per request, per token, as bandwidth next to this machine's memcpy
bandwidth), and each pool's peak use against what it reserved. Weight memory is
counted per copy (disagg loads one per instance, semi-PD one in all).
"""

from __future__ import annotations

import argparse
import re
import tempfile

from experiments.bench.common import emit, scrape_metrics
from experiments.bench.engine import memory_bandwidth
from experiments.loadgen import run_loadgen
from experiments.sweep.config import LoadgenConfig, SLOConfig, WorkloadConfig
from experiments.sweep.launch import EngineServer
from semipd_engine.config import EngineConfig, ModelConfig, ServerConfig, freeze
from semipd_engine.model import resolve


def by_instance(m: dict[str, float], name: str) -> dict[str, float]:
    return {re.search(r'instance="([^"]+)"', k).group(1): v for k, v in m.items() if k.startswith(name + "{")}


def run_engine(engine: str, args, spec) -> dict:
    extra = {"prefill_share": 50, "decode_share": 50} if engine == "semipd" else {}
    ecfg = freeze(EngineConfig, {"name": engine, "kv_cache_mb": args.kv_mb, **extra})
    mcfg = freeze(ModelConfig, {"name": args.model})
    wcfg = freeze(WorkloadConfig, {"name": "synthetic", "rate": args.rate, "num_requests": args.requests})
    with tempfile.TemporaryDirectory() as d, EngineServer(mcfg, ecfg, freeze(ServerConfig, {}), d) as srv:
        s = run_loadgen(freeze(LoadgenConfig, {"base_url": srv.url, "progress": False}), wcfg,
                        freeze(SLOConfig, {}), d)
        m = scrape_metrics(srv.url)
    total, peak = by_instance(m, "kv_blocks_total"), by_instance(m, "kv_blocks_used_peak")
    weights = spec.num_params() * 4
    copies = len([i for i in total if i != "shared"]) if engine == "disagg" else 1
    res = {"engine": engine, "requests_ok": s.aggregates.num_ok,
           "prompt_tokens": m.get("prompt_tokens_total", 0.0),
           "kv_transfer_bytes": m.get("kv_transfer_bytes_total", 0.0),
           "kv_transfers": m.get("kv_transfer_seconds_count", 0.0),
           "kv_transfer_seconds": m.get("kv_transfer_seconds_sum", 0.0),
           "pools": {i: {"reserved_blocks": total[i], "peak_used_blocks": peak.get(i, 0.0),
                         "peak_fraction": peak.get(i, 0.0) / total[i]} for i in total},
           "weight_copies": copies, "weight_bytes": weights * copies,
           "p90_ttft_s": s.aggregates.ttft_s.p90, "p90_tpot_s": s.aggregates.tpot_s.p90}
    if res["kv_transfers"]:
        res["transfer_bytes_per_request"] = res["kv_transfer_bytes"] / res["kv_transfers"]
        res["transfer_us_per_request"] = 1e6 * res["kv_transfer_seconds"] / res["kv_transfers"]
        res["transfer_bytes_per_token"] = res["kv_transfer_bytes"] / max(res["prompt_tokens"], 1)
        res["transfer_gb_s"] = res["kv_transfer_bytes"] / max(res["kv_transfer_seconds"], 1e-12) / 1e9
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--model", default="tiny")
    ap.add_argument("--rate", type=float, default=6.0)
    ap.add_argument("--requests", type=int, default=120)
    ap.add_argument("--kv-mb", type=int, default=64)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    spec = resolve(freeze(ModelConfig, {"name": args.model})).spec
    out = {"memcpy_gb_s": memory_bandwidth() / 2 / 1e9,  # one-way bytes/s, comparable to transfer_gb_s
           "kv_bytes_per_token": spec.kv_bytes_per_token(4),
           "engines": [run_engine(e, args, spec) for e in ("disagg", "semipd")]}
    emit(out, args.out)


if __name__ == "__main__":
    main()
