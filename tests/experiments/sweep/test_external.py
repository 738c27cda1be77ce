"""External engines: launched from a command template, attached to by URL, and failing clearly."""

from __future__ import annotations

import json
import time

import pandas as pd
import pytest

from experiments.sweep.job import Job, read_job, run
from experiments.sweep.launch import ServerStartError
from tests.helpers.experiment_configs import compose_run
from tests.helpers.mock_openai import MockOpenAIServer

LOAD = ["experiment=single", "workload=fixed", "workload.prompt_len=16", "workload.output_len=8",
        "workload.num_requests=12", "workload.rate=6", "wandb.mode=disabled", "loadgen.progress=false",
        "experiment.skip_finished=false"]
MOCK = "{python} -m tests.helpers.mock_openai --port {port}"


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split()[2] != "Z"  # a zombie has exited (its parent just has not reaped it)
    except OSError:
        return False


def test_our_server_as_a_black_box_gives_the_built_in_engines_rows(tmp_path):
    builtin = run(compose_run([*LOAD, "engine=unified", "model=tiny"]), str(tmp_path / "builtin"))
    external = run(compose_run([*LOAD, "engine=command", "model=tiny"]), str(tmp_path / "external"))
    assert builtin["status"] == external["status"] == "ok"
    a, b = (pd.read_parquet(tmp_path / d / "requests.parquet") for d in ("builtin", "external"))
    assert list(a.columns) == list(b.columns)
    cols = ["request_id", "prompt_tokens", "output_tokens", "expected_output_tokens", "error"]
    pd.testing.assert_frame_equal(a[cols], b[cols])
    ext = json.loads((tmp_path / "external" / "external.json").read_text())
    assert ext["command"][1:4] == ["-m", "semipd_engine.serve", "engine=unified"]
    series = pd.read_parquet(tmp_path / "external" / "server_metrics.parquet")
    assert {"requests_running", "requests_waiting"} <= set(series["metric"]) and series["time_s"].is_monotonic_increasing


def test_a_mock_openai_server_runs_as_an_external_command(tmp_path):
    cfg = compose_run([*LOAD, "engine=command", f"engine.external.command='{MOCK}'",
                       "engine.external.health_path=/v1/models", "loadgen.tokenizer=none"])
    rec = run(cfg, str(tmp_path / "job"), overrides={"engine": "command"})
    assert rec["status"] == "ok" and rec["num_errors"] == 0 and rec["slo_attainment"] == 1.0
    assert rec["engine"] == "command"  # figures tell external engines apart by their preset


def test_attach_mode_drives_a_running_server_and_leaves_it_running(tmp_path):
    with MockOpenAIServer(ttft_s=0.01, itl_s=0.002) as srv:
        cfg = compose_run([*LOAD, "engine=attach", f"engine.external.url={srv.url}",
                           "engine.external.health_path=/v1/models", "loadgen.tokenizer=none"])
        rec = run(cfg, str(tmp_path / "job"))
        # the load's 12 requests, plus the job's short step probes before and after it
        assert rec["status"] == "ok" and len(srv.received) >= 12
        assert len(pd.read_parquet(tmp_path / "job" / "requests.parquet")) == 12
        assert json.loads((tmp_path / "job" / "external.json").read_text())["attached"] == srv.url


@pytest.mark.parametrize("command, timeout, message", [
    ("no-such-engine-binary --port {port}", 30, "'no-such-engine-binary'"),
    ("{python} -c 'import sys; print(\"bad flag\"); sys.exit(3)'", 30, "exited with code 3"),
    # a server that never answers, and a child of it: both must be gone after the timeout
    ("{python} -c 'import os, subprocess, sys, time; c = subprocess.Popen([sys.executable, \"-c\", "
     "\"import time; time.sleep(120)\"]); open(\"PIDS\", \"w\").write(f\"{{os.getpid()}} {{c.pid}}\"); "
     "time.sleep(120)'", 3, "not healthy after 3"),
])
def test_bad_commands_fail_clearly_and_leave_no_process(tmp_path, command, timeout, message):
    pids = tmp_path / "pids"
    cfg = compose_run([*LOAD, "engine=command", f"engine.external.startup_timeout_s={timeout}"])
    cfg.engine.external.command = command.replace("PIDS", str(pids))  # as a YAML file or quoted override sets it
    t0 = time.monotonic()
    with pytest.raises(ServerStartError, match=message) as err:
        run(cfg, str(tmp_path / "job"))
    assert time.monotonic() - t0 < timeout + 25
    if "exited" in message:
        assert "bad flag" in str(err.value)  # the log tail is in the message
    assert read_job(tmp_path / "job")["status"] == "failed"
    if pids.exists():
        started = [int(p) for p in pids.read_text().split()]
        assert len(started) == 2 and not any(_alive(p) for p in started)


@pytest.mark.parametrize("override, message", [
    (["engine.external.command=null"], "engine.external.command"),
    (["backend=sim"], "backend=sim"),
    (["slo=tight", "model=hf", "model.path=/no/such/checkpoint"], "slo.scale"),
    (["engine.external.command='{python} --port {prot}'"], "unknown or malformed placeholder"),
])
def test_misconfigured_external_engines_fail_before_anything_runs(tmp_path, override, message):
    cfg = compose_run([*LOAD, "engine=command", *override])
    with pytest.raises(ValueError, match=message):
        run(cfg, str(tmp_path / "job"))  # config errors in Job.from_cfg; template errors when it is filled
    assert not (tmp_path / "job" / "requests.parquet").exists() and not (tmp_path / "job" / "server.log").exists()


def test_every_preset_fills_its_command_template():
    from experiments.sweep.launch import fill, template_fields

    for preset in ("vllm", "vllm_chunked", "sglang", "semipd_fork", "command"):
        job = Job.from_cfg(compose_run(["experiment=single", f"engine={preset}", "model=hf", "model.path=/m/llama",
                                        "model.tensor_parallel_size=4", "slo=default"]))
        fields = template_fields(job.model, job.engine, 1234)
        argv = fill(job.engine.external.command, fields, "engine.external.command").split()
        assert any(a.endswith("1234") for a in argv) and any("/m/llama" in a for a in argv), preset
        if preset in ("vllm", "vllm_chunked", "sglang", "semipd_fork"):
            assert "4" in argv, preset  # tensor parallelism reaches the engine
        env = {k: fill(v, fields, k) for k, v in job.engine.external.env.items()}
        if preset == "semipd_fork":
            assert env == {"SEMI_PD_PREFILL_SM_PERCENTILE": "80", "SEMI_PD_DECODE_SM_PERCENTILE": "100"}


def test_a_failed_start_shows_the_error_even_when_the_log_goes_on_after_it(tmp_path):
    from experiments.sweep.launch import excerpt

    lines = ["INFO starting", "Traceback (most recent call last):", '  File "x.py", line 1, in <module>',
             "ValueError: the head size 16 is not supported", *[f"INFO shutting down {i}" for i in range(60)]]
    text = excerpt(lines, n=40)
    assert "ValueError: the head size 16 is not supported" in text and "Traceback" in text
    assert "INFO shutting down 59" in text and "INFO starting" not in text and "(20 lines)" in text
    assert excerpt(lines[-30:], n=40) == "\n".join(lines[-30:])  # nothing above the tail: the tail alone
    # through a launch: the cause 60 lines above the end is in the error
    noisy = ("{python} -c 'import sys; print(\"ValueError: bad flag --frobnicate\"); "
             "[print(\"cleanup\", i) for i in range(60)]; sys.exit(2)'")
    cfg = compose_run([*LOAD, "engine=command"])
    cfg.engine.external.command = noisy
    with pytest.raises(ServerStartError, match="bad flag --frobnicate"):
        run(cfg, str(tmp_path / "job"))


def test_the_engines_own_python_runs_it_and_reports_its_version(tmp_path):
    import sys

    from experiments.sweep.launch import ExternalServer

    job = Job.from_cfg(compose_run([*LOAD, "engine=vllm", "model=hf", "model.path=/m/llama",
                                    f"engine.external.python={sys.executable}", "slo=default"]))
    x = job.engine.external
    assert x.command.startswith("{python} -m vllm.entrypoints.openai.api_server")
    srv = ExternalServer(job.model, job.engine, str(tmp_path))
    assert srv.argv[0] == sys.executable
    ext = json.loads((tmp_path / "external.json").read_text())
    assert ext["version_command"].startswith(sys.executable)  # not whatever `python` is first on PATH
    assert "No module named 'vllm'" in ext["version"]  # this environment has no vLLM: said, not hidden


def test_each_external_engine_has_its_own_step_probe_calibration():
    from experiments.sweep.probe import calibration_key

    keys = {calibration_key(Job.from_cfg(compose_run(["experiment=single", f"engine={e}", "model=hf",
                                                       "model.path=/m/llama", "slo=default"])), [0, 1], {"cpu": "x"})
            for e in ("vllm", "vllm_chunked", "sglang", "semipd_fork")}
    assert len(keys) == 4


def test_keys_added_to_the_external_dicts_on_the_command_line():
    """Hydra adds a key that a config does not have with `+`, as the README writes them."""
    cfg = compose_run(["experiment=single", "engine=vllm", "model=hf", "model.path=/m/llama", "slo=default",
                       "+engine.external.env.VLLM_CPU_KVCACHE_SPACE=4",
                       "+engine.external.metrics.ttft_sum_s=vllm:time_to_first_token_seconds_sum"])
    job = Job.from_cfg(cfg)
    assert job.engine.external.env["VLLM_CPU_KVCACHE_SPACE"] == "4"
    assert job.engine.external.metrics["ttft_sum_s"] == "vllm:time_to_first_token_seconds_sum"
    assert job.engine.external.metrics["iterations"] == "vllm:iteration_tokens_total_count"  # the preset's own


def test_a_sweep_mixing_vllm_and_a_built_in_engine_composes(tmp_path, monkeypatch):
    """`python run.py -m engine=vllm,unified model=hf model.path=DIR workload.rate=1,2`: vLLM's environment from
    $SEMIPD_VLLM_PYTHON (the built-in engine takes no engine.external key), the machine-relative SLOs of the
    demo measured once on this project's unified engine for both, and a `+key` override checked as typed."""
    from omegaconf import open_dict

    from experiments.sweep import capacity
    from experiments.sweep.plan import check_jobs

    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    monkeypatch.setenv("SEMIPD_VLLM_PYTHON", "/opt/vllm/bin/python")
    job = Job.from_cfg(compose_run(["engine=vllm", "model=hf", f"model.path={ckpt}"]))  # the demo's SLOs
    assert job.engine.external.python == "/opt/vllm/bin/python" and job.slo.ttft_scale == 14.0
    # the engine keeps its own `auto` (it may run on a GPU); the SLO baseline is measured in this machine's choice
    from experiments.sweep.job import resolve_machine

    kept, decided = resolve_machine(job, {"cpu": "test cpu", "cores": 2})
    assert kept.model.dtype == "auto" and decided["baseline_model"].dtype == "float32"
    from hydra import compose, initialize_config_dir

    from experiments.sweep import conf_store

    with initialize_config_dir(config_dir=conf_store.CONF_DIR, version_base=None):  # as a multirun has it
        cfg = compose("config", overrides=["model=hf", f"model.path={ckpt}"], return_hydra_config=True)
        with open_dict(cfg):
            cfg.hydra.overrides.task = ["engine=vllm,unified", "workload.rate=1,2",
                                        "+engine.external.env.VLLM_CPU_KVCACHE_SPACE=1"]
        assert all("+engine.external.env.VLLM_CPU_KVCACHE_SPACE=1" in o for o in capacity.sweep_overrides(cfg))
        with pytest.raises(ValueError, match="does not apply to engine 'unified'"):
            check_jobs(cfg)  # composed with its `+`: the env key reaches the unified job, which refuses it by name
        with open_dict(cfg):
            cfg.hydra.overrides.task = ["engine=vllm,unified", "workload.rate=1,2"]
        check_jobs(cfg)  # without it, both engines' configs are what they read
