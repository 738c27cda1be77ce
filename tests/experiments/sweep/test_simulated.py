"""Simulated jobs go through the same pipeline as real ones: rows, summary, sweep, figures, goodput search."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from experiments.analysis import request_metrics as M
from experiments.loadgen.client import Planned, Record, to_frame
from experiments.sweep import simulated
from experiments.sweep.job import Job
from semipd_engine.config import EngineConfig, ModelConfig, freeze
from semipd_engine.sim.config import BackendConfig, HardwareConfig
from tests.helpers.experiment_configs import SLO, compose_run, loadgen_cfg, workload_cfg

ROOT = Path(__file__).resolve().parents[3]
SIM = freeze(BackendConfig, {"name": "sim"})
A100 = freeze(HardwareConfig, {"name": "a100-80g"})
LLAMA8B = freeze(ModelConfig, {"name": "llama3-8b", "dtype": "bfloat16"})


def test_simulated_rows_have_the_load_generators_columns(tmp_path):
    real = M.mark_measured(M.derive(to_frame([Record(0, 0.0, 0.0, 0.1, 0.5, [0.1, 0.3, 0.5], 5, 3, 3, 200)],
                                             [Planned(0, "x", 5, 3, 0.0)], 0.0)), loadgen_cfg("unused"))
    e = freeze(EngineConfig, {"name": "unified", "max_num_seqs": 256})
    w = workload_cfg(name="synthetic", num_requests=50, rate=5.0)
    s = simulated.run_simulated(LLAMA8B, e, A100, SIM, loadgen_cfg("unused"), w, SLO, str(tmp_path))
    df = pd.read_parquet(tmp_path / "requests.parquet")
    assert list(df.columns) == list(real.columns)
    assert len(df) == 50 and df["error"].isna().all() and (df["output_tokens"] == df["expected_output_tokens"]).all()
    assert (df["ttft_s"] > 0).all() and (df["token_times_s"].map(len) == df["output_tokens"]).all()
    assert s.backend["name"] == "sim" and s.aggregates.num_ok == 50
    on_disk = json.loads((tmp_path / "summary.json").read_text())
    assert on_disk["aggregates"]["slo_attainment"] == s.aggregates.slo_attainment


@pytest.mark.parametrize("engine", ["unified", "disagg", "semipd"])
def test_simulated_jobs_record_the_servers_queues_and_kv_over_time(tmp_path, engine):
    from experiments.analysis.server_metrics import job_timeseries

    e = freeze(EngineConfig, {"name": engine})
    w = workload_cfg(name="synthetic", num_requests=200, rate=20.0)
    simulated.run_simulated(LLAMA8B, e, A100, SIM, loadgen_cfg("unused"), w, SLO, str(tmp_path))
    ts = job_timeseries(tmp_path)
    assert ts is not None and (ts["clock"] == "load").all() and len(ts) >= 150  # to the last finish
    assert ts["requests_running"].max() > 0 and 0 < ts["kv_usage"].max() <= 1
    assert ts["time_s"].is_monotonic_increasing and ts["time_s"].iloc[0] == 0
    if engine == "disagg":  # one series per instance as well as the total
        assert {c for c in ts if c.startswith("kv_usage/")} == {"kv_usage/prefill0", "kv_usage/decode0"}
    if engine == "semipd":
        assert (ts["partition_prefill_share"] == e.prefill_share).all()
    decode = ts["iteration_time_s/decode"].dropna()  # mean decode iteration between samples, as a server's
    assert len(decode) > 50 and (decode > 0).all() and decode.max() < 1.0


def test_simulated_arrivals_follow_the_workload_schedule(tmp_path):
    e = freeze(EngineConfig, {"name": "semipd", "prefill_share": 100, "decode_share": 100})
    w = workload_cfg(name="fixed", prompt_len=100, output_len=10, num_requests=30, arrival="constant", rate=2.0)
    simulated.run_simulated(LLAMA8B, e, A100, SIM, loadgen_cfg("unused"), w, SLO, str(tmp_path))
    df = pd.read_parquet(tmp_path / "requests.parquet")
    assert df["scheduled_s"].diff().dropna().round(9).eq(0.5).all()
    assert (df["prompt_tokens"] == 100).all() and (df["output_tokens"] == 10).all()


@pytest.mark.parametrize("override, key", [
    (["hardware=h100", "hardware.name=b300"], "hardware.name"),
    (["model.tensor_parallel_size=3"], "model.tensor_parallel_size"),
    (["model=llama3-70b", "hardware=a100-40g"], "does not fit"),
    (["backend.cost_model=table"], "backend.cost_model"),
])
def test_bad_simulated_jobs_fail_before_anything_runs(override, key):
    cfg = compose_run(["experiment=single", "backend=sim", "model=llama3-8b", *override])
    with pytest.raises(ValueError, match=key.replace(".", r"\.")):
        Job.from_cfg(cfg)


def test_a_shape_without_weights_needs_the_simulator():
    with pytest.raises(ValueError, match="backend=sim"):
        Job.from_cfg(compose_run(["experiment=single", "model=llama3-8b"]))


def test_paper_preset_sweep_with_figures_and_goodput_runs_in_seconds(tmp_path):
    env = {**os.environ, "WANDB_MODE": "disabled"}
    common = [f"results_dir={tmp_path}", "workload.num_requests=150", "hydra.sweep.dir=" + str(tmp_path / "{}")]
    sweep = [sys.executable, "run.py", "experiment=paper_llama3_8b_sharegpt", "engine=unified,disagg,semipd_dynamic",
             "workload.rate=8,28", "slo=llama3_8b_sharegpt_tight", *[c.format("rates") for c in common]]
    out = subprocess.run(sweep, cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-3000:]
    summary = pd.read_csv(tmp_path / "rates" / "summary.csv")
    assert len(summary) == 6 and set(summary["status"]) == {"ok"}
    assert set(summary["engine"]) == {"unified", "disagg", "semipd_dynamic"}
    jobs = [json.loads(p.read_text()) for p in (tmp_path / "rates").glob("*/job.json")]
    assert {j["backend"] for j in jobs} == {"sim"} and {j["hardware"] for j in jobs} == {"a100-80g"}
    assert {j["num_gpus"] for j in jobs if j["engine"] == "disagg"} == {2}
    low = summary[summary["rate"] == 8].set_index("engine")["slo_attainment"]
    assert (low >= 0.9).all()  # 8 req/s per GPU is well inside every engine's capacity on an A100
    figures = {p.name for p in (tmp_path / "rates" / "figures").glob("*.png")}
    assert {"slo_attainment_vs_rate.png", "p90_latency_vs_rate.png", "mean_e2e_vs_rate.png"} <= figures
    goodput = [sys.executable, "run.py", "experiment=paper_goodput", "engine=unified",
               "experiment.goodput_seeds=[0]", "experiment.goodput_tolerance=2", "experiment.goodput_high=32",
               *[c.format("goodput") for c in common], "workload.num_requests=400",
               # fewer running requests than the run sends (the paper's 512 would admit all 400: nothing queues)
               "request_caps=preset", "engine.max_num_seqs=256"]
    out = subprocess.run(goodput, cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-3000:]
    job = json.loads(next((tmp_path / "goodput").glob("*/job.json")).read_text())
    probes = json.loads(next((tmp_path / "goodput").glob("*/summary.json")).read_text())["probes"]
    # a prefill-priority engine saturates near 20 req/s here: the bisection must land strictly inside
    assert 8.0 < job["goodput_rate"] < 32.0 and len(probes) >= 4
    assert "goodput_per_engine.png" in {p.name for p in (tmp_path / "goodput" / "figures").glob("*.png")}


def test_a_shared_prefix_workload_hits_the_cache_alike_on_both_backends(tmp_path):
    """The same requests (token ids, groups sharing a 64-token system prompt), spaced so that each one's
    group prefix is cached before it arrives: the real engine and the simulator find the same cached tokens."""
    from experiments.loadgen.client import run_loadgen
    from tests.helpers.server import ServerProcess

    wcfg = workload_cfg(name="shared_prefix", num_prefix_groups=3, prefix_len=64, prompt_mean=20, prompt_sigma=0.3,
                        output_mean=4, output_sigma=0.3, num_requests=24, arrival="constant", rate=4.0,
                        max_prompt_len=256, max_total_len=320)
    srv = ServerProcess("engine=unified", "model=tiny", "engine.kv_cache_mb=32")
    try:
        lcfg = loadgen_cfg(srv.url, tokenizer="builtin", prompt_format="token_ids")
        real = run_loadgen(lcfg, wcfg, SLO)
    finally:
        srv.stop()
    sim = simulated.run_simulated(freeze(ModelConfig, {"name": "tiny"}), freeze(EngineConfig, {"name": "unified"}),
                                  A100, SIM, lcfg, wcfg, SLO)
    # 3 groups: the first request of each misses, the other 21 find their group's 4 full blocks
    assert real.aggregates.num_ok == sim.aggregates.num_ok == 24
    assert real.aggregates.prefix_cache_hit_rate == sim.aggregates.prefix_cache_hit_rate > 0.5
    # At Llama-3-8B scale a 2,048-token system prompt is most of a prefill's cost: priced on the uncached tail only
    long = workload_cfg(name="shared_prefix", num_prefix_groups=2, prefix_len=2048, prompt_mean=64, prompt_sigma=0.3,
                        output_mean=16, output_sigma=0.3, num_requests=40, arrival="constant", rate=2.0,
                        max_prompt_len=4096, max_total_len=4608)
    on, off = (simulated.run_simulated(LLAMA8B, freeze(EngineConfig, {"name": "unified", "enable_prefix_caching": c}),
                                       A100, SIM, lcfg, long, SLO) for c in (True, False))
    assert off.aggregates.prefix_cache_hit_rate == 0.0 and on.aggregates.prefix_cache_hit_rate > 0.9
    assert on.aggregates.ttft_s.p50 < 0.3 * off.aggregates.ttft_s.p50


@pytest.mark.parametrize("history", ["recorded", "generated"])
def test_a_conversation_hits_its_history_alike_on_both_backends(tmp_path, history):
    """Multi-turn as token ids: every later turn resends its conversation so far, and the real engine and the
    simulator find the same cached tokens (think times leave each turn's KV cached). With the generated history
    the client resends the answer's ids as the server returned them (return_token_ids): the random model's text
    would not re-encode to them, and the real engine would miss the blocks its decode wrote."""
    from experiments.loadgen.client import run_loadgen
    from tests.helpers.server import ServerProcess

    wcfg = workload_cfg(name="synthetic", multi_turn=True, history=history, turns_mean=3.0, num_requests=18,
                        prompt_mean=40, prompt_sigma=0.3, output_mean=6, output_sigma=0.3, rate=3.0,
                        think_time_s=0.3, think_time_dist="constant", max_prompt_len=512, max_total_len=600)
    srv = ServerProcess("engine=unified", "model=tiny", "engine.kv_cache_mb=32")
    try:
        lcfg = loadgen_cfg(srv.url, tokenizer="builtin", prompt_format="token_ids")
        real = run_loadgen(lcfg, wcfg, SLO, str(tmp_path / "real"))
    finally:
        srv.stop()
    simulated.run_simulated(freeze(ModelConfig, {"name": "tiny"}), freeze(EngineConfig, {"name": "unified"}),
                            A100, SIM, lcfg, wcfg, SLO, str(tmp_path / "sim"))
    # every turn (each backend measures its own plateau, whose ends depend on its timing)
    rows = {k: pd.read_parquet(tmp_path / k / "requests.parquet") for k in ("real", "sim")}
    assert all(len(r) == 18 and r["error"].isna().all() for r in rows.values()) and real.workload.num_conversations > 3
    assert M.prefix_cache_hit_rate(rows["real"]) == M.prefix_cache_hit_rate(rows["sim"]) > 0.3


def test_generated_answers_are_cached_where_the_next_turn_is_prefilled_unless_the_kv_was_shipped_away():
    """The history as generated: a next turn resends its answer, whose KV the decode phase wrote. Unified and
    semi-PD (one pool) find it; a disaggregated prefill instance never had it (the decode instance did, so the
    transfer sends only what the decode instance lacks). Each turn is sent the think time after the answer
    before it ended."""
    wcfg = workload_cfg(name="synthetic", multi_turn=True, turns_mean=4.0, num_requests=240, rate=4.0,
                        prompt_mean=200, output_mean=200, think_time_s=1.0, max_prompt_len=8192,
                        max_total_len=10240)
    def simulate(engine, w=wcfg, **kw):  # every turn's row (the plateau of each run is its own)
        e = freeze(EngineConfig, {"name": engine, "max_num_seqs": 256, **kw})
        run, workload, _ = simulated.simulation(LLAMA8B, e, A100, SIM, loadgen_cfg("unused"), w)
        return run, workload, M.prefix_cache_hit_rate(run.frame)

    rate = {engine: simulate(engine)[2] for engine in ("unified", "semipd")}
    disagg, _, rate["disagg"] = simulate("disagg")
    # ... but the decode instance kept the history's KV: only what it lacks is sent
    assert disagg.backend["kv_transfer_cached_blocks"] > 0
    off = simulate("disagg", enable_prefix_caching=False)[0].backend
    assert (disagg.backend["kv_transfer_bytes"] / disagg.backend["kv_transfers"]
            < 0.5 * off["kv_transfer_bytes"] / off["kv_transfers"])
    assert rate["unified"] == rate["semipd"] > rate["disagg"] > 0.2
    recorded = simulate("unified", dataclasses.replace(wcfg, history="recorded"))[2]
    assert recorded < rate["unified"] - 0.1  # the recorded answers were never computed, hence never cached
    run, workload, _ = simulate("unified")
    df = run.frame.set_index("request_id").sort_index()
    for i, it in enumerate(workload.items):
        if it.turn:
            assert abs(df.loc[i, "scheduled_s"] - (df.loc[i - 1, "finish_s"] + it.think_s)) < 1e-9
            assert df.loc[i, "prompt_tokens"] == it.prompt_len  # the answer had the recorded length (ignore_eos)


def _twins():
    """An engine, a workload and a load generator's settings, with a tight and a loose pair of SLOs."""
    from experiments.sweep.config import SLOConfig

    tight, loose = freeze(SLOConfig, {"ttft_s": 0.05, "tpot_s": 0.02}), freeze(SLOConfig, {"ttft_s": 5.0,
                                                                                            "tpot_s": 0.5})
    return (freeze(EngineConfig, {"name": "unified", "max_num_seqs": 64}), workload_cfg(num_requests=150, rate=10.0),
            loadgen_cfg("http://unused"), tight, loose)


def test_runs_judged_differently_share_one_simulation_and_a_changed_simulation_never_does(tmp_path):
    e, w, lcfg, tight, loose = _twins()
    cache = tmp_path / "sim_cache"
    a = simulated.run_simulated(LLAMA8B, e, A100, SIM, lcfg, w, tight, cache_dir=cache)
    b = simulated.run_simulated(LLAMA8B, e, A100, SIM, lcfg, w, loose, str(tmp_path / "b"), cache_dir=cache)
    ref = simulated.run_simulated(LLAMA8B, e, A100, SIM, lcfg, w, loose, str(tmp_path / "ref"))
    assert not a.backend["from_cache"] and b.backend["from_cache"] and a.backend["simulation_key"] == \
        b.backend["simulation_key"]
    assert a.aggregates.slo_attainment < b.aggregates.slo_attainment == ref.aggregates.slo_attainment
    assert (b.aggregates.ttft_s, b.aggregates.tpot_s, b.aggregates.goodput) == \
        (ref.aggregates.ttft_s, ref.aggregates.tpot_s, ref.aggregates.goodput)
    pd.testing.assert_frame_equal(pd.read_parquet(tmp_path / "b" / "requests.parquet"),
                                  pd.read_parquet(tmp_path / "ref" / "requests.parquet"))
    changed = [  # each changes what is simulated: none may be served the cached run
        (LLAMA8B, dataclasses.replace(e, max_num_seqs=32), A100, SIM, lcfg, w),
        (LLAMA8B, dataclasses.replace(e, enable_prefix_caching=False), A100, SIM, lcfg, w),
        (freeze(ModelConfig, {"name": "llama-2-7b", "dtype": "bfloat16"}), e, A100, SIM, lcfg, w),
        (LLAMA8B, e, freeze(HardwareConfig, {"name": "h100"}), SIM, lcfg, w),
        (LLAMA8B, e, A100, freeze(BackendConfig, {"name": "sim", "overhead_s": 0.002}), lcfg, w),
        (LLAMA8B, e, A100, SIM, lcfg, dataclasses.replace(w, seed=1)),
        (LLAMA8B, e, A100, SIM, lcfg, dataclasses.replace(w, rate=11.0)),
        (LLAMA8B, e, A100, SIM, loadgen_cfg("http://unused", tokenizer="builtin"), w),
    ]
    for args in changed:
        assert not simulated.run_simulated(*args, loose, cache_dir=cache).backend["from_cache"], args
    assert len(list(cache.glob("*.json"))) == 1 + len(changed)


def test_runs_that_differ_in_their_slos_alone_share_the_judging_that_does_not_read_them(tmp_path):
    """The second of two SLO twins reads the first's rows and bootstrapped intervals: its summary and its
    requests.parquet are those a fresh judging gives; another measurement window judges afresh."""
    e, w, lcfg, tight, loose = _twins()
    cache = tmp_path / "sim_cache"
    a = simulated.run_simulated(LLAMA8B, e, A100, SIM, lcfg, w, tight, str(tmp_path / "a"), cache_dir=cache)
    b = simulated.run_simulated(LLAMA8B, e, A100, SIM, lcfg, w, loose, str(tmp_path / "b"), cache_dir=cache)
    ref = simulated.run_simulated(LLAMA8B, e, A100, SIM, lcfg, w, loose, str(tmp_path / "ref"))
    assert not a.backend["judged_from_cache"] and b.backend["judged_from_cache"]
    same = json.dumps(dataclasses.asdict(b.aggregates), sort_keys=True)
    assert same == json.dumps(dataclasses.asdict(ref.aggregates), sort_keys=True)  # every interval, NaN included
    assert same != json.dumps(dataclasses.asdict(a.aggregates), sort_keys=True)  # its SLOs judged it
    assert (tmp_path / "b" / "requests.parquet").read_bytes() == (tmp_path / "a" / "requests.parquet").read_bytes()
    pd.testing.assert_frame_equal(pd.read_parquet(tmp_path / "b" / "requests.parquet"),
                                  pd.read_parquet(tmp_path / "ref" / "requests.parquet"))
    other = simulated.run_simulated(LLAMA8B, e, A100, SIM, loadgen_cfg("http://unused", warmup_requests=40), w,
                                    loose, str(tmp_path / "other"), cache_dir=cache)
    assert other.backend["from_cache"] and not other.backend["judged_from_cache"]
    assert other.aggregates.num_requests < b.aggregates.num_requests
    # its rows read back from the first judging's file, judged anew: what simulating it gives
    fresh = simulated.run_simulated(LLAMA8B, e, A100, SIM, loadgen_cfg("http://unused", warmup_requests=40), w,
                                    loose, str(tmp_path / "fresh"))
    pd.testing.assert_frame_equal(pd.read_parquet(tmp_path / "other" / "requests.parquet"),
                                  pd.read_parquet(tmp_path / "fresh" / "requests.parquet"))
    assert json.dumps(dataclasses.asdict(other.aggregates), sort_keys=True) == \
        json.dumps(dataclasses.asdict(fresh.aggregates), sort_keys=True)


def test_a_simulated_job_names_the_serving_stack_it_charges():
    from experiments.sweep.simulated import stack_name

    unified, semipd = freeze(EngineConfig, {"name": "unified"}), freeze(EngineConfig, {"name": "semipd"})
    assert stack_name(unified, freeze(BackendConfig, {"name": "sim"})) == "vllm-0.6"
    assert stack_name(semipd, freeze(BackendConfig, {"name": "sim"})) == "semipd"
    assert stack_name(unified, freeze(BackendConfig, {"name": "sim", "stack": {"name": "ideal"}})) == "ideal"
    assert stack_name(unified, freeze(BackendConfig, {"name": "sim", "overhead_s": 0.002})) == "vllm-0.6*"
    assert stack_name(unified, freeze(BackendConfig, {"name": "sim", "cost_model": "profile"})) == "profile"


def test_a_controller_that_decides_alike_under_other_slos_replays_the_simulation(tmp_path):
    """semipd_dynamic runs that differ in their SLOs alone: where the second's controller makes every decision
    the first's made, from the first's windows, it is served the first's simulation (rows, partition log and
    summary those of simulating it); where it would move elsewhere, it is simulated."""
    from experiments.sweep.config import SLOConfig

    def engine(ttft, tpot):
        return freeze(EngineConfig, {"name": "semipd_dynamic", "prefill_share": 50, "decode_share": 50,
                                     "control_window_s": 1.0, "max_num_seqs": 64, "slo_ttft_s": ttft,
                                     "slo_tpot_s": tpot})

    w, lcfg, cache = workload_cfg(num_requests=200, rate=10.0), loadgen_cfg("http://unused"), tmp_path / "sim_cache"

    def run(ttft, tpot, out, cached=True):
        slo = freeze(SLOConfig, {"ttft_s": ttft, "tpot_s": tpot})
        return simulated.run_simulated(LLAMA8B, engine(ttft, tpot), A100, SIM, lcfg, w, slo, str(tmp_path / out),
                                       cache_dir=cache if cached else None)

    a = run(5.0, 0.5, "a")
    b, ref = run(8.0, 0.8, "b"), run(8.0, 0.8, "ref", cached=False)
    assert not a.backend["from_cache"] and b.backend["from_cache"] and b.backend["replayed_controller"]
    decisions = [json.loads(x) for x in (tmp_path / "b" / "partition_log.jsonl").read_text().splitlines()]
    assert len(decisions) > 10 and any(d["reason"] == "both pass: keep" for d in decisions)
    assert (tmp_path / "b" / "partition_log.jsonl").read_text() == (tmp_path / "ref" / "partition_log.jsonl").read_text()
    pd.testing.assert_frame_equal(pd.read_parquet(tmp_path / "b" / "requests.parquet"),
                                  pd.read_parquet(tmp_path / "ref" / "requests.parquet"))
    assert json.dumps(dataclasses.asdict(b.aggregates), sort_keys=True) == \
        json.dumps(dataclasses.asdict(ref.aggregates), sort_keys=True)
    c = run(0.001, 0.5, "c")  # TTFT fails: it moves to prefill
    run(0.001, 0.5, "ref_c", cached=False)
    assert not c.backend["from_cache"]
    assert any(d["prefill_share"] != 50 for d in map(json.loads, (tmp_path / "c" / "partition_log.jsonl")
                                                     .read_text().splitlines()))
    pd.testing.assert_frame_equal(pd.read_parquet(tmp_path / "c" / "requests.parquet"),
                                  pd.read_parquet(tmp_path / "ref_c" / "requests.parquet"))
