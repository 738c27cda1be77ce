"""One result type for a run: what both backends produce, what a sweep row and summary.json are made of."""

from __future__ import annotations

import json

import pandas as pd
import pytest

from experiments.analysis.request_metrics import TPOT_DEFINITIONS, derive
from experiments.loadgen import run_loadgen
from experiments.loadgen.client import LoadgenError
from experiments.loadgen.result import Aggregates, Latency, RunResult, SLOs, WorkloadRun, measured
from experiments.sweep import simulated
from experiments.sweep.config import SLOConfig
from semipd_engine.config import EngineConfig, ModelConfig, freeze
from semipd_engine.sim.config import BackendConfig, HardwareConfig
from tests.helpers.experiment_configs import SLO, loadgen_cfg, workload_cfg
from tests.helpers.mock_openai import MockOpenAIServer


def _result(**kw) -> RunResult:
    stats = {m: Latency(*(i * 10 + j for j in range(4))) for i, m in enumerate(("ttft_s", "tpot_s", "itl_s", "e2e_s"))}
    a = Aggregates(num_requests=10, num_ok=9, num_errors=1, duration_s=5.0, request_throughput=4.0,
                   output_token_throughput=400.0, total_token_throughput=900.0, slo_attainment=0.8, goodput=3.2,
                   **stats)
    return RunResult(a, SLOs(1.0, 0.1), WorkloadRun("fixed", 10, "poisson", 2.0),
                     **{"self_check": {"valid": False}, **kw})


def test_a_row_picks_each_metric_from_its_place():
    h = _result().row()
    assert (h["slo_attainment"], h["goodput_rps"], h["request_throughput"], h["output_token_throughput"]) == \
        (0.8, 3.2, 4.0, 400.0)
    assert (h["num_requests"], h["num_errors"], h["client_valid"]) == (10, 1, False)
    assert (h["mean_ttft_s"], h["p90_tpot_s"], h["p50_itl_s"], h["p99_e2e_s"]) == (0, 12, 21, 33)
    assert h["endpoint"] is None and "mean_prompt_tokens" not in h  # a result without them (simulated, old)
    # 10 counts, 16 latencies, the TPOT definition with attainment under each of 5, stalls (2), steady state (2)
    assert len(h) == 10 + 16 + 10 and h["prefix_cache_hit_rate"] is None
    assert h["tpot_definition"] == "mean" and h["steady_state"] is None and h["slo_attainment_tpot_max_itl"] is None


def test_an_incomplete_run_is_not_ok_and_every_check_gives_its_reason():
    r = _result(self_check={"reasons": []}, host={"reasons": []},
                completeness={"planned": 40, "rows": 28, "not_sent": 12, "cancelled": 0, "complete": False})
    assert r.status == "incomplete"
    assert r.checked().reasons == ("incomplete: 28 of 40 requests recorded, 12 not sent, 0 cancelled",)
    judged = r.with_checks(host={"reasons": ["host interference: other processes used 40% of the job's 2 core(s)"]})
    assert len(judged.validity.reasons) == 2 and not judged.validity_columns()["valid"]
    assert _result(interrupted=True, signal="SIGTERM").status == "interrupted"


def test_both_backends_produce_the_same_result_and_it_round_trips_through_its_file(tmp_path):
    w = workload_cfg(name="fixed", prompt_len=8, output_len=6, num_requests=12, arrival="poisson", rate=20.0)
    with MockOpenAIServer(ttft_s=0.02, itl_s=0.005) as srv:
        real = run_loadgen(loadgen_cfg(srv.url), w, SLO, str(tmp_path / "real"))
    sim = simulated.run_simulated(freeze(ModelConfig, {"name": "llama3-8b", "dtype": "bfloat16"}),
                                  freeze(EngineConfig, {"name": "unified"}), freeze(HardwareConfig, {"name": "a100-80g"}),
                                  freeze(BackendConfig, {"name": "sim"}), loadgen_cfg("unused"), w, SLO,
                                  str(tmp_path / "sim"))
    for r, d in ((real, "real"), (sim, "sim")):
        assert isinstance(r, RunResult) and r.aggregates.num_requests == r.aggregates.num_ok == 12
        assert r.workload == WorkloadRun("fixed", 12, "poisson", 20.0, 0, r.workload.lengths)
        assert r.workload.lengths["prompt_tokens"]["mean"] == 8
        # summary.json is the result, read back whole (compared as JSON: an empty interval is NaN)
        assert json.dumps(RunResult.load(tmp_path / d).to_dict(), default=str) == json.dumps(r.to_dict(), default=str)
        on_disk = json.loads((tmp_path / d / "summary.json").read_text())
        assert on_disk["aggregates"]["ttft_s"]["p90"] == r.aggregates.ttft_s.p90 == r["aggregates"]["ttft_s"]["p90"]
        # both time every token (the client by streamed chunk): every definition judged, stalls counted
        td = on_disk["tpot_definitions"]
        assert None not in td["slo_attainment"].values() and td["requests_without_token_times"] == 0, d
        assert td["stalled_requests"] is not None and "steady_state" in on_disk["steady_state"]
    # one schema: the simulated file differs only by the simulator's counters and what needs a client
    keys = {d: set(json.loads((tmp_path / d / "summary.json").read_text())) for d in ("real", "sim")}
    assert keys["sim"] - keys["real"] == {"backend"}
    assert keys["real"] - keys["sim"] == {"endpoint", "completeness", "context"}
    assert set(real.row()) == set(sim.row())


def test_reading_an_old_summary_keeps_what_it_has():
    old = {"aggregates": {"num_requests": 3, "num_ok": 3, "num_errors": 0, "duration_s": 1.0,
                          "request_throughput": 3.0, "output_token_throughput": 30.0, "total_token_throughput": 60.0,
                          "slo_attainment": 1.0, "goodput": 3.0, "ttft_s": {"mean": 0.1, "p50": 0.1, "p90": 0.1,
                                                                             "p99": 0.1}},
           "slo": {"ttft_s": 1.0, "tpot_s": 0.1}, "workload": {"name": "x", "num_requests": 3, "arrival": "poisson",
                                                              "rate": 3.0, "unknown_later_key": 1}}
    r = RunResult.from_dict(old)
    assert r.aggregates.ttft_s.p90 == 0.1 and r.aggregates.tpot_s == Latency() and r.status == "ok"
    # written before TPOT definitions and steady state: judged by the mean, no verdict, and written back as it was
    assert r.aggregates.tpot_definition == r.slo.tpot_definition == "mean" and r.aggregates.reached_steady_state is None
    assert r.row()["steady_state"] is None and r.row()["stalled_requests"] is None
    assert not {"tpot_definitions", "steady_state"} & set(r.to_dict())
    with pytest.raises(KeyError):
        r["no_such_key"]


def _stalling_run(n=30):
    """`n` requests 0.1 s apart, six tokens 20 ms apart after a 50 ms TTFT; every fifth stalls 0.5 s after its
    first token (mean TPOT 116 ms -> 0.5 s / 5 + 16 ms: meets a 0.2 s SLO as a mean, not as a max gap)."""
    rows = []
    for i in range(n):
        t0 = 0.1 * i
        times = [t0 + 0.05 + 0.02 * k + (0.5 if i % 5 == 0 and k else 0.0) for k in range(6)]
        rows.append({"request_id": i, "scheduled_s": t0, "send_s": t0, "first_token_s": times[0],
                     "finish_s": times[-1], "token_times_s": times, "prompt_tokens": 8, "output_tokens": 6,
                     "error": None})
    return derive(pd.DataFrame(rows))


def test_the_row_and_summary_json_carry_every_tpot_definition_and_the_steady_state(tmp_path):
    slo = freeze(SLOConfig, {"ttft_s": 1.0, "tpot_s": 0.2, "tpot_definition": "max_itl"})
    df, a = measured(_stalling_run(), loadgen_cfg("unused", warmup_requests=0), slo)
    assert {f"tpot_{d}_s" for d in TPOT_DEFINITIONS if d != "mean"} <= set(df.columns)  # saved with the rows
    # SLOs given as the two thresholds take the definition the attainment was judged under
    r = RunResult(a, SLOs(1.0, 0.2), WorkloadRun("fixed", 30, "constant", 10.0), {"valid": True, "reasons": []})
    assert r.slo.tpot_definition == a.tpot_definition == "max_itl"
    assert a.slo_attainment == pytest.approx(24 / 30) and a.goodput == pytest.approx(24 / a.duration_s)
    row = r.row()
    assert row["tpot_definition"] == "max_itl" and row["slo_attainment"] == row["slo_attainment_tpot_max_itl"]
    assert row["slo_attainment_tpot_mean"] == 1.0 and (row["stalled_requests"], row["stalled_fraction"]) == (6, 0.2)
    assert row["steady_state"] is True and abs(row["backlog_growth"]) < 0.5

    r.write(tmp_path)
    on_disk = json.loads((tmp_path / "summary.json").read_text())
    assert on_disk["slo"] == {"ttft_s": 1.0, "tpot_s": 0.2, "tpot_definition": "max_itl"}
    assert on_disk["tpot_definitions"]["chosen"] == "max_itl"
    assert set(on_disk["tpot_definitions"]["slo_attainment"]) == set(TPOT_DEFINITIONS)
    assert on_disk["tpot_definitions"]["stalled_requests"] == 6
    assert on_disk["steady_state"]["steady_state"] is True
    assert {"first_half", "second_half", "thresholds"} <= set(on_disk["steady_state"])
    assert {"requests", "slo_attainment", "mean_in_system"} == set(on_disk["steady_state"]["first_half"])
    assert "steady_state" not in on_disk["aggregates"]  # one place for each block
    assert RunResult.load(tmp_path).to_dict() == json.loads(json.dumps(r.to_dict(), default=str))


def test_an_unknown_tpot_definition_is_refused_naming_the_key():
    slo = freeze(SLOConfig, {"tpot_definition": "p95_itl"})
    with pytest.raises(ValueError, match=r"slo.tpot_definition='p95_itl': expected one of mean, p90_itl"):
        measured(_stalling_run(), loadgen_cfg("unused"), slo)
    wl = workload_cfg(name="fixed", prompt_len=8, output_len=2, num_requests=2)
    with pytest.raises(LoadgenError, match="slo.tpot_definition='p95_itl'"):  # before anything is sent
        run_loadgen(loadgen_cfg("http://127.0.0.1:9"), wl, slo)
    # gaps need a stream: refused before sending too
    with pytest.raises(LoadgenError, match="loadgen.stream=true, or slo.tpot_definition=mean"):
        run_loadgen(loadgen_cfg("http://127.0.0.1:9", stream=False), wl,
                    freeze(SLOConfig, {"tpot_definition": "max_itl"}))
