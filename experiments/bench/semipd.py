"""semi-PD partition switching: what does a switch cost a request?

    python -m experiments.bench.semipd [--switches 20] [--interval 0.5] [--device cuda --backend green_context]

A semi-PD server (tiny model) runs a closed-loop decode-heavy load while the
partition is switched every `interval` seconds. The request-visible stall of a
switch is the inter-token gap that spans it minus the median gap of the same
stream; the worker-side stall (applying the new core set and thread count) is
read from the server's partition_switch_stall_seconds histogram.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import threading
import time
import urllib.request

import numpy as np
import pandas as pd

from experiments.bench.common import emit, metric_total, scrape_metrics
from experiments.loadgen import run_loadgen
from experiments.sweep.config import LoadgenConfig, SLOConfig, WorkloadConfig
from experiments.sweep.launch import EngineServer
from semipd_engine.config import EngineConfig, ModelConfig, ServerConfig, freeze


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--switches", type=int, default=20)
    ap.add_argument("--interval", type=float, default=0.5)
    ap.add_argument("--device", default="cpu", help="model.device (cuda: SM shares)")
    ap.add_argument("--backend", default="auto", help="engine.partition_backend (auto, cpu_quota, cpu_affinity, "
                                                      "green_context, mps)")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    shares = [(100, 50), (50, 100), (50, 50), (100, 100)]
    with tempfile.TemporaryDirectory() as d:
        mcfg = freeze(ModelConfig, {"name": "tiny", "device": args.device})
        ecfg = freeze(EngineConfig, {"name": "semipd", "prefill_share": 50, "decode_share": 50,
                                     "partition_backend": args.backend})
        with EngineServer(mcfg, ecfg, freeze(ServerConfig, {}), d) as srv:
            wcfg = freeze(WorkloadConfig, {"name": "fixed", "prompt_len": 64, "output_len": 400,
                                           "num_requests": 64, "arrival": "closed", "max_concurrency": 16})
            lcfg = freeze(LoadgenConfig, {"base_url": srv.url, "progress": False})
            switch_times: list[float] = []

            def switcher():
                time.sleep(2.0)
                for i in range(args.switches):
                    x, y = shares[i % len(shares)]
                    req = urllib.request.Request(srv.url + "/partition", method="POST",
                                                 data=json.dumps({"prefill_share": x, "decode_share": y}).encode(),
                                                 headers={"Content-Type": "application/json"})
                    switch_times.append(time.monotonic())
                    urllib.request.urlopen(req, timeout=10).read()
                    time.sleep(args.interval)

            t = threading.Thread(target=switcher)
            t.start()
            summary = run_loadgen(lcfg, wcfg, freeze(SLOConfig, {}), d)
            t.join()
            samples = scrape_metrics(srv.url)
            stall_sum = metric_total(samples, "partition_switch_stall_seconds_sum")
            stall_n = metric_total(samples, "partition_switch_stall_seconds_count")
            df = pd.read_parquet(f"{d}/requests.parquet")
        t0 = summary.t0_monotonic
    sw = np.array(switch_times) - t0
    spanning, normal = [], []
    for times in df["token_times_s"]:
        times = np.asarray(times)
        if len(times) < 3:
            continue
        gaps = np.diff(times)
        med = float(np.median(gaps))
        for a, b, g in zip(times[:-1], times[1:], gaps):
            (spanning if ((sw > a) & (sw <= b)).any() else normal).append((g, med))
    extra = np.array([g - m for g, m in spanning])
    res = {
        "switches": len(switch_times), "worker_applies": int(stall_n),
        "worker_stall_mean_us": 1e6 * stall_sum / max(stall_n, 1),
        "median_itl_ms": 1e3 * float(np.median([g for g, _ in normal])),
        "spanning_itl_extra_p50_ms": 1e3 * float(np.percentile(extra, 50)) if extra.size else None,
        "spanning_itl_extra_p90_ms": 1e3 * float(np.percentile(extra, 90)) if extra.size else None,
        "normal_itl_p90_ms": 1e3 * float(np.percentile([g for g, _ in normal], 90)),
        "errors": int(df["error"].notna().sum()),
        "requests": int(len(df)),
        "backend": args.backend,
    }
    emit(res, args.out)


if __name__ == "__main__":
    main()
