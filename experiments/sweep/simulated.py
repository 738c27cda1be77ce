"""One load run on the simulated backend: the same workload, schedule, rows and summary as a real run.

A real job starts a server and replays the workload over HTTP; a simulated one
hands the same requests (lengths from the same workload loader, arrival
offsets from the same schedule) to the simulated engine and writes
`requests.parquet` with the load generator's columns and `summary.json` with the
same aggregates, so aggregation, figures, W&B and the goodput search cannot tell
the two apart (a `backend` block in the summary says which it was).
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any, Optional

import pandas as pd

from experiments.analysis import request_metrics as M
from experiments.loadgen.arrivals import schedule
from experiments.loadgen.lengths import report as report_lengths
from experiments.loadgen.prompts import PromptBuilder, prompt_token_ids
from experiments.loadgen.result import RunResult, SLOs, measured, workload_run
from experiments.loadgen.workloads import load_workload


def _tokenizer(lcfg, wcfg):
    if wcfg.name != "sharegpt" or not lcfg.tokenizer or lcfg.tokenizer == "none":
        return None  # only real text needs counting
    from semipd_engine.serving.tokenizer import load_tokenizer

    return load_tokenizer(None if lcfg.tokenizer == "builtin" else lcfg.tokenizer)


def check(model_cfg, engine_cfg, hardware_cfg, backend_cfg) -> None:
    """Every bad preset fails here, naming its key, before a job runs (the simulator itself is built once, by the
    run)."""
    from semipd_engine.sim.build import validate

    validate(model_cfg, engine_cfg, hardware_cfg, backend_cfg)


SAMPLES = 200


def simulate(model_cfg, engine_cfg, hardware_cfg, backend_cfg, arrivals, prompt_lens, output_lens,
             prompt_ids=None):
    """Run the simulated engine; returns (finished requests, simulator, platform, wall seconds)."""
    from semipd_engine.sim.build import build_simulator
    from semipd_engine.sim.simulator import make_requests

    sim, plat = build_simulator(model_cfg, engine_cfg, hardware_cfg, backend_cfg)
    requests = make_requests([a + plat.request_delay_s for a in arrivals], prompt_lens, output_lens, prompt_ids)
    if len(arrivals) and max(arrivals) > 0:  # ~200 samples of the queues over the arrivals, as a server's gauges
        sim.sample_every(max(arrivals) / SAMPLES)
    t0 = time.perf_counter()
    done = sim.run(requests)
    for r, a in zip(requests, arrivals):  # latencies count from the client's send, as a real run's do
        r.times.arrival = float(a)
    return done, sim, plat, time.perf_counter() - t0


def to_frame(done, expected: dict[str, tuple[int, int]]) -> pd.DataFrame:
    rows = []
    for r in sorted(done, key=lambda r: int(r.request_id.rsplit("-", 1)[1])):
        t = r.times
        n_out = len(r.output_token_ids)
        p, o = expected[r.request_id]
        rows.append({
            "request_id": int(r.request_id.rsplit("-", 1)[1]), "scheduled_s": t.arrival, "send_s": t.arrival,
            "first_token_s": t.first_token, "finish_s": t.finished, "token_times_s": list(t.tokens),
            "prompt_tokens": r.num_prompt_tokens, "output_tokens": n_out, "expected_prompt_tokens": p,
            "expected_output_tokens": o, "num_chunks": n_out, "http_status": 200, "error": None,
            "cached_tokens": r.num_cached_tokens or 0,
        })
    return pd.DataFrame(rows)


def run_simulated(model_cfg, engine_cfg, hardware_cfg, backend_cfg, lcfg, wcfg, slo,
                  output_dir: Optional[str] = None, resolved_config: Any = None) -> RunResult:
    """The simulated twin of `experiments.loadgen.run_loadgen`: same inputs, same files, the same result type."""
    workload = load_workload(wcfg, _tokenizer(lcfg, wcfg))
    lengths = report_lengths(workload, wcfg, lcfg.tokenizer)
    items = workload.items
    offsets = schedule(wcfg, len(items), [it.timestamp for it in items] if workload.has_timestamps else None)
    if offsets is None:
        raise ValueError("backend=sim replays open-loop arrivals (workload.arrival=poisson|gamma|constant|trace); "
                         "a closed loop needs a client")
    prompts = [it.prompt_len for it in items]
    outputs = [it.output_len for it in items]
    ids = None
    if any(it.prefix_group is not None or it.hash_blocks for it in items):  # the token ids a real run sends (prompt_format=token_ids)
        builder = PromptBuilder(_tokenizer(lcfg, wcfg), seed=wcfg.seed)
        ids = [prompt_token_ids(builder, it) for it in items]
    done, sim, plat, wall = simulate(model_cfg, engine_cfg, hardware_cfg, backend_cfg, offsets, prompts, outputs,
                                     ids)
    expected = {f"sim-{i}": (p, o) for i, (p, o) in enumerate(zip(prompts, outputs))}
    df, aggregates = measured(M.derive(to_frame(done, expected), lcfg.measure_from), lcfg, slo)
    st = sim.stats
    result = RunResult(
        aggregates=aggregates, slo=SLOs(slo.ttft_s, slo.tpot_s),
        # No client, no host: nothing can be late or disturbed. The model's own validity is in docs/benchmarks.md.
        self_check={"valid": True, "reasons": [], "simulated": True},
        workload=workload_run(workload, wcfg, len(items), lengths), model=model_cfg.path or model_cfg.name,
        length_mismatch={"prompt_mismatched": 0, "output_mismatched": int(
            (df["output_tokens"] != df["expected_output_tokens"]).sum()), "checked": int(len(df))},
        backend={"name": "sim", "cost_model": backend_cfg.cost_model, "platform": plat.describe,
                 "wall_s": wall, "simulated_requests_per_s": len(done) / wall if wall > 0 else None,
                 "iterations": st.iterations, "fast_forwarded_iterations": st.fast_forwarded,
                 "events": st.events, "kv_transfers": st.transfers, "kv_transfer_bytes": st.transfer_bytes,
                 "partition_switches": st.switches, "kv_blocks_used_peak": st.kv_peak_blocks},
        config=resolved_config,
        t0_monotonic=0.0)  # the virtual clock starts with the load: server samples are on the load's clock
    if output_dir:
        out = Path(output_dir)
        out.mkdir(parents=True, exist_ok=True)
        df.to_parquet(out / "requests.parquet", index=False)
        if st.samples:  # the same file a real job's MetricsRecorder writes (monotonic_s: the virtual time)
            pd.DataFrame(st.samples).assign(monotonic_s=lambda f: f["time_s"]).to_parquet(
                out / "server_metrics.parquet", index=False)
        result.write(out)
        if st.decisions:  # the same decision log a real semipd_dynamic job writes
            first = {"time_s": 0.0, "prefill_share": engine_cfg.prefill_share,
                     "decode_share": engine_cfg.decode_share, "reason": "start"}
            with open(out / "partition_log.jsonl", "w") as f:
                for row in [first, *st.decisions]:
                    f.write(json.dumps(row, default=float) + "\n")
    return result


def single_request_latency(model_cfg, engine_cfg, hardware_cfg, backend_cfg, prompt_len: int,
                           output_len: int) -> dict[str, float]:
    """TTFT and TPOT of one request alone on the simulated engine (what SLO scales multiply)."""
    done, *_ = simulate(model_cfg, engine_cfg, hardware_cfg, backend_cfg, [0.0], [prompt_len], [output_len])
    t = done[0].times
    return {"ttft_s": t.first_token - t.arrival,
            "tpot_s": (t.finished - t.first_token) / max(1, len(done[0].output_token_ids) - 1)}
