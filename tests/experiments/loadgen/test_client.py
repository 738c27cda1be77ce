"""Load generator client: timing accuracy, drift-free dispatch, faults, closed loop, the CLI."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import numpy as np
import pandas as pd
import pytest

from experiments.loadgen import LoadgenError, run_loadgen
from experiments.loadgen.arrivals import schedule
from tests.helpers.experiment_configs import SLO, loadgen_cfg, workload_cfg
from tests.helpers.mock_openai import MockOpenAIServer

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))


def test_ttft_and_tpot_within_1ms_of_truth_at_low_load(tmp_path):
    with MockOpenAIServer(ttft_s=0.05, itl_s=0.01) as srv:
        s = run_loadgen(loadgen_cfg(srv.url), workload_cfg(name="fixed", prompt_len=8, output_len=10, num_requests=20,
                                            arrival="constant", rate=10), SLO, str(tmp_path))
        writes = np.array(srv.writes)
    df = pd.read_parquet(tmp_path / "requests.parquet")
    assert df["error"].isna().all() and np.allclose(df["output_tokens"], 10)
    # Truth: when the server wrote each token, on the same monotonic clock as the client.
    sent = s.t0_monotonic + df["send_s"].to_numpy()
    ttft_true = writes[:, 0] - sent
    tpot_true = (writes[:, -1] - writes[:, 0]) / 9
    assert np.median(np.abs(df["ttft_from_send_s"].to_numpy() - ttft_true)) < 0.001
    assert np.median(np.abs(df["tpot_s"].to_numpy() - tpot_true)) < 0.001
    itl = np.concatenate(df["itl_s"].to_list())
    assert abs(np.median(itl) - np.median(np.diff(writes, axis=1))) < 0.001
    assert s.self_check["valid"], s.self_check
    assert (tmp_path / "summary.json").is_file()


def test_dispatch_is_drift_free_against_absolute_times():
    with MockOpenAIServer(ttft_s=0.001, itl_s=0.001) as srv:
        s = run_loadgen(loadgen_cfg(srv.url), workload_cfg(name="fixed", prompt_len=4, output_len=2, num_requests=100,
                                            arrival="poisson", rate=50), SLO)
        arrivals = np.array(srv.received)
    planned = schedule(workload_cfg(arrival="poisson", rate=50), 100)
    drift = (arrivals - arrivals[0]) - planned
    assert abs(drift[-1]) < 0.01 and s.self_check["valid"]


def test_errors_are_counted_never_dropped(tmp_path, monkeypatch):
    from experiments.loadgen import client as lg

    orig = lg.plan

    def faulty_plan(*a, **k):
        planned = orig(*a, **k)
        planned[1].prompt = "FAIL500 please"
        planned[3].prompt = "DROP this"
        return planned

    monkeypatch.setattr(lg, "plan", faulty_plan)
    with MockOpenAIServer(ttft_s=0.01, itl_s=0.001) as srv:
        s = run_loadgen(loadgen_cfg(srv.url), workload_cfg(name="fixed", prompt_len=4, output_len=5, num_requests=8,
                                            arrival="constant", rate=20), SLO, str(tmp_path))
    df = pd.read_parquet(tmp_path / "requests.parquet")
    assert len(df) == 8 and s.aggregates.num_errors == 2
    assert df.loc[1, "error"].startswith("HTTP 500") and df.loc[3, "error"]
    assert s.aggregates.slo_attainment == pytest.approx(6 / 8)


def test_dead_server_fails_fast():
    t = time.monotonic()
    with pytest.raises(LoadgenError, match="unreachable"):
        run_loadgen(loadgen_cfg("http://127.0.0.1:9"), workload_cfg(name="fixed", num_requests=2), SLO)
    assert time.monotonic() - t < 5


def test_closed_loop_respects_concurrency():
    with MockOpenAIServer(ttft_s=0.02, itl_s=0.005) as srv:
        s = run_loadgen(loadgen_cfg(srv.url), workload_cfg(name="fixed", prompt_len=4, output_len=4, num_requests=12,
                                            arrival="closed", max_concurrency=3), SLO)
        gaps = np.diff(np.array(srv.received))
    assert s.aggregates.num_ok == 12
    assert (gaps[:2] < 0.01).all() and gaps[2] > 0.02  # 3 at once, then one per completion


def test_ctrl_c_writes_partial_results(tmp_path):
    with MockOpenAIServer(ttft_s=0.01, itl_s=0.01) as srv:
        proc = subprocess.Popen([sys.executable, "-m", "experiments.loadgen", f"base_url={srv.url}",
                                 "workload=fixed", "workload.rate=5", "workload.num_requests=200",
                                 "workload.output_len=5", "loadgen.tokenizer=none", "loadgen.progress=false",
                                 f"output_dir={tmp_path}"], cwd=ROOT, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 60  # the interpreter and its imports first: seconds on a busy machine
        while len(srv.bodies) < 6 and time.monotonic() < deadline and proc.poll() is None:
            time.sleep(0.05)
        proc.send_signal(signal.SIGINT)
        out = proc.communicate(timeout=30)[0].decode()
    assert proc.returncode == 0, out
    df = pd.read_parquet(tmp_path / "requests.parquet")
    assert len(df) == 200 and 3 < df["error"].isna().sum() < 200
    assert df["error"].dropna().str.contains("interrupted").all()


def test_chat_mode_measures_what_completions_mode_measures(tmp_path):
    wl = workload_cfg(name="fixed", prompt_len=8, output_len=10, num_requests=20, arrival="constant", rate=10)
    got = {}
    with MockOpenAIServer(ttft_s=0.05, itl_s=0.01) as srv:
        for endpoint in ("completions", "chat"):
            s = run_loadgen(loadgen_cfg(srv.url, endpoint=endpoint), wl, SLO, str(tmp_path / endpoint))
            got[endpoint] = s
        paths = srv.paths
    assert paths == ["/v1/completions"] * 20 + ["/v1/chat/completions"] * 20
    comp, chat = (got[e].aggregates for e in ("completions", "chat"))
    assert chat.num_ok == comp.num_ok == 20
    for m in ("ttft_s", "tpot_s"):  # the server's truth is the same: 50 ms and 10 ms
        assert abs(chat.latency(m).p50 - comp.latency(m).p50) < 0.002, (m, chat.latency(m), comp.latency(m))
    assert got["chat"].endpoint == "chat" and got["completions"].endpoint == "completions"


def test_chat_prompts_have_the_exact_length_under_the_chat_template(tmp_path):
    from tests.helpers.server import ServerProcess

    srv = ServerProcess("engine=unified", "model=tiny")
    try:
        wl = workload_cfg(name="fixed", prompt_len=40, output_len=4, num_requests=6, arrival="constant", rate=20)
        for endpoint in ("chat", "completions"):
            s = run_loadgen(loadgen_cfg(srv.url, endpoint=endpoint, tokenizer="builtin"), wl, SLO,
                            str(tmp_path / endpoint))
            df = pd.read_parquet(tmp_path / endpoint / "requests.parquet")
            assert df["error"].isna().all(), df["error"].tolist()
            assert (df["prompt_tokens"] == 40).all(), (endpoint, df["prompt_tokens"].tolist())  # server's count
            assert s.length_mismatch["prompt_mismatched"] == 0
            assert s.workload.lengths["prompt_tokens"]["mean"] == 40
    finally:
        srv.stop()


def test_chat_with_token_ids_is_refused_before_sending():
    wl = workload_cfg(name="fixed", prompt_len=8, output_len=2, num_requests=2)
    with pytest.raises(LoadgenError, match="prompt_format=token_ids"):
        run_loadgen(loadgen_cfg("http://127.0.0.1:9", endpoint="chat", prompt_format="token_ids"), wl, SLO)
    with pytest.raises(LoadgenError, match="loadgen.endpoint"):
        run_loadgen(loadgen_cfg("http://127.0.0.1:9", endpoint="responses"), wl, SLO)


def test_requests_that_do_not_fit_the_servers_context_are_clamped_dropped_or_sent_and_counted(tmp_path):
    from experiments.loadgen.client import Planned, fit_context

    planned = [Planned(0, "a", 100, 20, 0.0), Planned(1, "b", 120, 20, 0.1), Planned(2, "c", 130, 5, 0.2),
               Planned(3, "d", -1, 500, 0.3)]  # unknown prompt length: not judged
    kept, rep = fit_context(planned, 128, "clamp")
    assert [(p.idx, p.output_tokens) for p in kept] == [(0, 20), (1, 8), (3, 500)]
    assert (rep["over_context"], rep["clamped"], rep["dropped"]) == (2, 1, 1)
    kept, rep = fit_context(planned, 128, "drop")
    assert [p.idx for p in kept] == [0, 3] and rep["dropped"] == 2
    kept, rep = fit_context(planned, 128, "send")
    assert kept == planned and rep["over_context"] == 2
    assert fit_context(planned, None, "clamp")[0] == planned  # a server that does not say: nothing to do
    # end to end: the server's context read from /v1/models, the clamped request asks for what fits
    w = workload_cfg(name="fixed", prompt_len=8, output_len=10, num_requests=6, arrival="poisson", rate=20.0)
    with MockOpenAIServer(ttft_s=0.01, itl_s=0.002, max_model_len=14) as srv:  # prompts of exactly 8 tokens
        s = run_loadgen(loadgen_cfg(srv.url, tokenizer="builtin"), w, SLO, str(tmp_path))
    assert srv.max_tokens == [6] * 6 and s.context["clamped"] == 6 and s.context["max_model_len"] == 14
    assert s.length_mismatch["output_mismatched"] == 0 and s.row()["over_context"] == 6


@pytest.mark.parametrize("endpoint", ["completions", "chat"])
def test_a_conversations_next_turn_carries_the_answer_it_got_and_waits_its_think_time(tmp_path, endpoint):
    from experiments.loadgen import conversations as conv

    w = workload_cfg(name="synthetic", multi_turn=True, num_requests=12, rate=20.0, think_time_s=0.15,
                     think_time_dist="constant", output_mean=3, output_sigma=0.01, prompt_mean=5, prompt_sigma=0.01)
    with MockOpenAIServer(ttft_s=0.01, itl_s=0.002) as srv:
        run_loadgen(loadgen_cfg(srv.url, endpoint=endpoint), w, SLO, str(tmp_path))
        bodies = list(srv.bodies)
    df = pd.read_parquet(tmp_path / "requests.parquet")
    assert df["error"].isna().all() and len(df) == len(bodies) == 12 and df["turn"].max() >= 1
    key = "messages" if endpoint == "chat" else "prompt"
    # the mock saw them in the order they were sent
    df = df.sort_values("send_s").assign(prompt=[b[key] for b in bodies]).set_index("request_id").sort_index()
    for i, row in df.iterrows():
        if not row["turn"]:
            continue
        prev = df.loc[i - 1]
        assert prev["conversation_id"] == row["conversation_id"] and prev["turn"] == row["turn"] - 1
        answer = "".join(f"t{k} " for k in range(int(prev["output_tokens"])))  # what the mock answered
        message = row["prompt"][-1]["content"] if endpoint == "chat" else row["prompt"].rsplit(conv.SEP, 1)[-1]
        got, before = row["prompt"], prev["prompt"]
        if endpoint == "chat":
            got, before = list(got), list(before)
        assert got == conv.extend(before, answer, message)
        # sent the think time after the previous answer ended, not on the arrival process's clock
        assert abs(row["scheduled_s"] - (prev["finish_s"] + 0.15)) < 1e-9 and row["send_s"] >= row["scheduled_s"]


def test_a_failed_turn_ends_its_conversation_and_every_request_is_accounted_for(tmp_path, monkeypatch):
    from experiments.loadgen import client as lg

    orig = lg.plan

    def failing_first_turn(*a, **k):
        planned = orig(*a, **k)
        planned[0].prompt = "FAIL500 " + planned[0].prompt
        return planned

    monkeypatch.setattr(lg, "plan", failing_first_turn)
    w = workload_cfg(name="synthetic", multi_turn=True, num_requests=10, rate=50.0, think_time_s=0.0,
                     output_mean=3, output_sigma=0.01, prompt_mean=5, prompt_sigma=0.01, turns_mean=3.0)
    with MockOpenAIServer(ttft_s=0.005, itl_s=0.001) as srv:
        r = run_loadgen(loadgen_cfg(srv.url), w, SLO, str(tmp_path))
    df = pd.read_parquet(tmp_path / "requests.parquet")
    first = df[df["conversation_id"] == 0]
    assert first["error"].iloc[0].startswith("HTTP 500")
    assert first["error"].iloc[1:].str.startswith("not sent: turn 0").all()
    assert df[df["conversation_id"] != 0]["error"].isna().all() and len(df) == 10
    assert r.completeness["rows"] == 10
