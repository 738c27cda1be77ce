"""Load generator: timing accuracy, schedules, trace formats, faults, outputs."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pandas as pd
import pytest
from scipy import stats

from experiments.arrivals import interarrival_distribution, schedule
from experiments.config import LoadgenConfig, SLOConfig, WorkloadConfig
from experiments.loadgen import LoadgenError, run_loadgen
from experiments.workloads import WorkloadError, load_workload
from semipd_engine.config import freeze
from tests.helpers.mock_openai import MockOpenAIServer

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def wcfg(**kw):
    return freeze(WorkloadConfig, kw)


def lcfg(url, **kw):
    return freeze(LoadgenConfig, {"base_url": url, "progress": False, "tokenizer": "none", **kw})


SLO = freeze(SLOConfig, {})


def test_ttft_and_tpot_within_1ms_of_truth_at_low_load(tmp_path):
    with MockOpenAIServer(ttft_s=0.05, itl_s=0.01) as srv:
        s = run_loadgen(lcfg(srv.url), wcfg(name="fixed", prompt_len=8, output_len=10, num_requests=20,
                                            arrival="constant", rate=10), SLO, str(tmp_path))
        writes = np.array(srv.writes)
    df = pd.read_parquet(tmp_path / "requests.parquet")
    assert df["error"].isna().all() and np.allclose(df["output_tokens"], 10)
    # Truth: when the server wrote each token, on the same monotonic clock as the client.
    sent = s["t0_monotonic"] + df["send_s"].to_numpy()
    ttft_true = writes[:, 0] - sent
    tpot_true = (writes[:, -1] - writes[:, 0]) / 9
    assert np.median(np.abs(df["ttft_from_send_s"].to_numpy() - ttft_true)) < 0.001
    assert np.median(np.abs(df["tpot_s"].to_numpy() - tpot_true)) < 0.001
    itl = np.concatenate(df["itl_s"].to_list())
    assert abs(np.median(itl) - np.median(np.diff(writes, axis=1))) < 0.001
    assert s["self_check"]["valid"], s["self_check"]
    assert (tmp_path / "summary.json").is_file()


@pytest.mark.parametrize("arrival,burst", [("poisson", 1.0), ("gamma", 0.5), ("gamma", 2.0)])
def test_schedules_pass_ks(arrival, burst):
    cfg = wcfg(arrival=arrival, rate=5.0, burstiness=burst, seed=3)
    gaps = np.diff(schedule(cfg, 2000))
    assert stats.kstest(gaps, interarrival_distribution(cfg).cdf).pvalue > 0.01
    # and the test has power: the other distribution fails
    other = wcfg(arrival="gamma", rate=5.0, burstiness=burst * 4, seed=3)
    assert stats.kstest(gaps, interarrival_distribution(other).cdf).pvalue < 0.01


def test_dispatch_is_drift_free_against_absolute_times():
    with MockOpenAIServer(ttft_s=0.001, itl_s=0.001) as srv:
        s = run_loadgen(lcfg(srv.url), wcfg(name="fixed", prompt_len=4, output_len=2, num_requests=100,
                                            arrival="poisson", rate=50), SLO)
        arrivals = np.array(srv.received)
    planned = schedule(wcfg(arrival="poisson", rate=50), 100)
    drift = (arrivals - arrivals[0]) - planned
    assert abs(drift[-1]) < 0.01 and s["self_check"]["valid"]


def test_errors_are_counted_never_dropped(tmp_path, monkeypatch):
    from experiments import loadgen as lg

    orig = lg.plan

    def faulty_plan(*a, **k):
        planned = orig(*a, **k)
        planned[1].prompt = "FAIL500 please"
        planned[3].prompt = "DROP this"
        return planned

    monkeypatch.setattr(lg, "plan", faulty_plan)
    with MockOpenAIServer(ttft_s=0.01, itl_s=0.001) as srv:
        s = run_loadgen(lcfg(srv.url), wcfg(name="fixed", prompt_len=4, output_len=5, num_requests=8,
                                            arrival="constant", rate=20), SLO, str(tmp_path))
    df = pd.read_parquet(tmp_path / "requests.parquet")
    assert len(df) == 8 and s["aggregates"]["num_errors"] == 2
    assert df.loc[1, "error"].startswith("HTTP 500") and df.loc[3, "error"]
    assert s["aggregates"]["slo_attainment"] == pytest.approx(6 / 8)


def test_dead_server_fails_fast():
    t = time.monotonic()
    with pytest.raises(LoadgenError, match="unreachable"):
        run_loadgen(lcfg("http://127.0.0.1:9"), wcfg(name="fixed", num_requests=2), SLO)
    assert time.monotonic() - t < 5


def test_closed_loop_respects_concurrency():
    with MockOpenAIServer(ttft_s=0.02, itl_s=0.005) as srv:
        s = run_loadgen(lcfg(srv.url), wcfg(name="fixed", prompt_len=4, output_len=4, num_requests=12,
                                            arrival="closed", max_concurrency=3), SLO)
        gaps = np.diff(np.array(srv.received))
    assert s["aggregates"]["num_ok"] == 12
    assert (gaps[:2] < 0.01).all() and gaps[2] > 0.02  # 3 at once, then one per completion


# -- workloads -------------------------------------------------------------------


def test_shipped_traces_parse():
    moon = load_workload(wcfg(name="mooncake", num_requests=50, length_scale=0.05, max_prompt_len=2048,
                              max_total_len=4096))
    azure = load_workload(wcfg(name="azure", num_requests=50, time_scale=2.0))
    for w in (moon, azure):
        assert len(w.items) == 50 and w.has_timestamps
        ts = [i.timestamp for i in w.items]
        assert ts[0] == 0 and ts == sorted(ts)
    assert azure.items[-1].timestamp < 60  # 50 requests of a busy hour, at 2x speed


def test_trace_window_and_time_scale():
    full = load_workload(wcfg(name="azure", num_requests=10**6, window_s=60.0))
    fast = load_workload(wcfg(name="azure", num_requests=10**6, window_s=60.0, time_scale=3.0))
    assert len(full.items) == len(fast.items) > 10
    assert fast.items[-1].timestamp == pytest.approx(full.items[-1].timestamp / 3)
    assert full.items[-1].timestamp < 60


def test_burstgpt_csv(tmp_path):
    p = tmp_path / "burst.csv"
    p.write_text("Timestamp,Model,Request tokens,Response tokens,Total tokens,Log Type\n"
                 "5,ChatGPT,100,50,150,Conversation log\n7.5,ChatGPT,20,0,20,Conversation log\n"
                 "9,GPT-4,300,80,380,API log\n")
    w = load_workload(wcfg(name="burstgpt", path=str(p)))
    assert [(i.prompt_len, i.output_len, i.timestamp) for i in w.items] == [(100, 50, 0.0), (300, 80, 4.0)]


@pytest.mark.parametrize("name,content,where", [
    ("mooncake", '{"timestamp": 0, "input_length": 5, "output_length": 3}\n{"timestamp": 1, "input_length": 5}\n',
     ":2:"),
    ("mooncake", '{"timestamp": 0, "input_length": 5, "output_length": 3}\nnot json\n', ":2:"),
    ("azure", "TIMESTAMP,ContextTokens,GeneratedTokens\n2023-11-16 18:15:46.6805900,10,5\n"
              "2023-11-16 18:15:47.0000000,ten,5\n", ":3:"),
    ("azure", "TIME,ContextTokens\n1,2\n", ":1:"),
    ("sharegpt", "[{\"id\": 1}]", "record 0"),
    ("sharegpt", "[{\"id\": 1, ", "not valid JSON"),
])
def test_malformed_files_fail_naming_file_and_line(tmp_path, name, content, where):
    p = tmp_path / f"bad.{name}"
    p.write_text(content)
    with pytest.raises(WorkloadError) as e:
        load_workload(wcfg(name=name, path=str(p)))
    assert str(p) in str(e.value) and where in str(e.value)


def test_sharegpt_roles_checked_and_filters(tmp_path):
    data = [
        {"id": "a", "conversations": [{"from": "gpt", "value": "I start"}, {"from": "human", "value": "hi"}]},
        {"id": "b", "conversations": [{"from": "human", "value": "tell me a story"},
                                      {"from": "gpt", "value": "once upon a time there was a fox"}]},
        {"id": "c", "conversations": [{"from": "human", "value": "only a question"}]},
        {"id": "d", "conversations": [{"from": "human", "value": "x " * 3000}, {"from": "gpt", "value": "ok"}]},
    ]
    p = tmp_path / "sg.json"
    p.write_text(json.dumps(data))
    from semipd_engine.tokenizer import builtin_tokenizer

    w = load_workload(wcfg(name="sharegpt", path=str(p), num_requests=10), builtin_tokenizer())
    assert [i.prompt_text for i in w.items] == ["tell me a story"]


def test_synthetic_matches_configured_means_and_filters():
    w = load_workload(wcfg(name="synthetic", num_requests=4000, max_prompt_len=10**6, max_total_len=10**7))
    p = np.array([i.prompt_len for i in w.items])
    o = np.array([i.output_len for i in w.items])
    assert abs(p.mean() / 161.3 - 1) < 0.1 and abs(o.mean() / 338.0 - 1) < 0.1
    f = load_workload(wcfg(name="synthetic", num_requests=500))
    assert all(i.prompt_len <= 1024 and i.prompt_len + i.output_len <= 2048 for i in f.items)


def test_text_prompts_have_exact_token_lengths():
    from experiments.prompts import PromptBuilder
    from semipd_engine.tokenizer import builtin_tokenizer

    tok = builtin_tokenizer()
    b = PromptBuilder(tok, seed=0)
    for n in (1, 7, 64, 500):
        text, got = b.text(n)
        assert got == n == len(tok.encode(text))


def test_ctrl_c_writes_partial_results(tmp_path):
    with MockOpenAIServer(ttft_s=0.01, itl_s=0.01) as srv:
        proc = subprocess.Popen([sys.executable, "-m", "experiments.loadgen", f"base_url={srv.url}",
                                 "workload=fixed", "workload.rate=5", "workload.num_requests=200",
                                 "workload.output_len=5", "loadgen.tokenizer=none", "loadgen.progress=false",
                                 f"output_dir={tmp_path}"], cwd=ROOT, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT)
        time.sleep(4)
        proc.send_signal(signal.SIGINT)
        out = proc.communicate(timeout=30)[0].decode()
    assert proc.returncode == 0, out
    df = pd.read_parquet(tmp_path / "requests.parquet")
    assert len(df) == 200 and 3 < df["error"].isna().sum() < 200
    assert df["error"].dropna().str.contains("interrupted").all()


def test_goodput_bisection_finds_the_rate_a_single_server_queue_sustains(tmp_path):
    """Service time 50 ms one at a time (capacity 20 req/s): attainment falls between the bounds."""
    from experiments.config import ExperimentConfig
    from experiments.runner import goodput_search

    exp = freeze(ExperimentConfig, {"mode": "goodput", "goodput_low": 5.0, "goodput_high": 40.0,
                                    "goodput_tolerance": 4.0, "goodput_seeds": [0]})
    slo = freeze(SLOConfig, {"ttft_s": 0.3, "tpot_s": 1.0})
    w = wcfg(name="fixed", prompt_len=4, output_len=1, num_requests=40, arrival="poisson")
    with MockOpenAIServer(ttft_s=0.05, itl_s=0.0, serial=True) as srv:
        s = goodput_search(lcfg(srv.url), w, slo, exp, tmp_path, None)
    g = s["goodput_rate"]
    rates = [p["rate"] for p in s["probes"]]
    assert rates[:2] == [5.0, 40.0] and len(rates) > 3 and 5.0 <= g < 40.0
    # The bisection's invariant: the rate it reports meets the target, one within the tolerance above fails.
    by_rate = {p["rate"]: p["slo_attainment"] for p in s["probes"]}
    assert by_rate[g] >= 0.9
    assert any(g < r <= g + 4.0 and a < 0.9 for r, a in by_rate.items()), s["probes"]
    assert (tmp_path / "summary.json").is_file() and len(pd.read_parquet(tmp_path / "requests.parquet")) == 40 * len(rates)
    assert s["aggregates"]["slo_attainment"] >= 0.9
