"""vLLM's CPU build under the harness, for real: a sweep launches it, measures it, scrapes its metrics and leaves
no process; a start it refuses fails the job with vLLM's own words and leaves no process.

Marked `external`: they run where $SEMIPD_VLLM_PYTHON names the Python of an environment with vLLM installed (the
README's one command) and are skipped elsewhere, so the default run needs no vLLM. Each vLLM start compiles for a
minute or more on a 2-core machine: `pytest -m external` takes ~10 minutes there.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from experiments.sweep.job import read_job, run
from experiments.sweep.launch import ServerStartError
from tests.helpers.experiment_configs import compose_run

VLLM_PYTHON = os.environ.get("SEMIPD_VLLM_PYTHON", "")
ROOT = Path(__file__).resolve().parents[3]
pytestmark = [pytest.mark.external, pytest.mark.timeout(2400),
              pytest.mark.skipif(not VLLM_PYTHON, reason="set SEMIPD_VLLM_PYTHON to a vLLM environment's python")]
KV = "+engine.external.env.VLLM_CPU_KVCACHE_SPACE=1"  # vLLM's KV budget in GiB (its default fraction is of RAM)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    from semipd_engine.model.export import export

    out = tmp_path_factory.mktemp("ckpt") / "llama-100m"
    export("llama-100m", str(out), dtype="bfloat16")
    return out


def vllm_servers() -> set[int]:
    """Pids of vLLM OpenAI servers (and their engine cores) alive on this machine."""
    pids = set()
    for p in Path("/proc").iterdir():
        if not p.name.isdigit():
            continue
        try:
            cmd = (p / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            state = (p / "stat").read_text().split()[2]
        except OSError:
            continue
        if state != "Z" and ("vllm.entrypoints" in cmd or "VLLM::EngineCore" in cmd):
            pids.add(int(p.name))
    return pids


def test_a_two_point_sweep_launches_vllm_measures_scrapes_and_leaves_nothing(tmp_path, checkpoint):
    before = vllm_servers()
    cmd = [sys.executable, "run.py", "-m", "experiment=single", "engine=vllm", "model=hf", f"model.path={checkpoint}",
           "model.dtype=bfloat16", "slo=default", "workload=fixed", "workload.prompt_len=64",
           "workload.output_len=16", "workload.num_requests=12", "workload.rate=1,2", "loadgen.progress=false", KV,
           f"results_dir={tmp_path}", f"hydra.sweep.dir={tmp_path / 'sweep'}"]
    out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=2400,
                         env={**os.environ, "WANDB_MODE": "disabled"})
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    summary = pd.read_csv(tmp_path / "sweep" / "summary.csv")
    assert sorted(summary["rate"]) == [1.0, 2.0] and set(summary["status"]) == {"ok"}
    assert (summary["num_errors"] == 0).all()
    for jd in (p.parent for p in (tmp_path / "sweep").glob("*/job.json")):
        rows = pd.read_parquet(jd / "requests.parquet")
        assert len(rows) == 12 and (rows["output_tokens"] == 16).all() and (rows["prompt_tokens"] == 64).all()
        ext = json.loads((jd / "external.json").read_text())
        assert ext["version"] and "Traceback" not in ext["version"]  # vLLM's own version, from its environment
        series = pd.read_parquet(jd / "server_metrics.parquet")
        # vLLM's gauges and counters under this project's names: the queue/KV figure and W&B read these
        assert {"requests_running", "requests_waiting", "kv_usage", "iterations", "generation_tokens",
                "prompt_tokens"} <= set(series["metric"]), set(series["metric"])
        generated = series[series["metric"] == "generation_tokens"]["value"].max()
        assert generated >= 12 * 16  # the load's tokens (and the step probes') counted by vLLM
    assert (tmp_path / "sweep" / "figures" / "server_queues_and_kv_over_time.png").is_file()
    assert vllm_servers() <= before  # every vLLM process of the sweep is gone


def test_a_refused_start_fails_the_job_with_vllms_words_and_leaves_no_process(tmp_path, checkpoint):
    before = vllm_servers()
    cfg = compose_run(["experiment=single", "engine=vllm", "model=hf", f"model.path={checkpoint}",
                       "model.dtype=bfloat16", "slo=default", "workload=fixed", "workload.num_requests=4",
                       "wandb.mode=disabled", "loadgen.progress=false", f"engine.external.python={VLLM_PYTHON}", KV,
                       "engine.external.extra_args=--no-such-flag"])
    with pytest.raises(ServerStartError) as err:
        run(cfg, str(tmp_path / "job"))
    assert "--no-such-flag" in str(err.value)  # vLLM's argument error, found in its log, is in the message
    assert read_job(tmp_path / "job")["status"] == "failed"
    assert vllm_servers() <= before


def test_vllms_benchmark_client_accepts_our_server(tmp_path):
    """`vllm bench serve` drives this project's server unchanged, beside this project's load generator (float32:
    this CPU's bf16 matmuls are emulated, and a bf16 server would be overloaded by the load)."""
    from experiments.bench import vs_vllm
    from semipd_engine.model.export import export

    checkpoint = tmp_path / "llama-100m"
    export("llama-100m", str(checkpoint), dtype="float32")
    args = vs_vllm.parse_args(["--vllm-python", VLLM_PYTHON, "--dtype", "float32", "--rate-requests", "12",
                               "--client-rate", "1", "--client-rounds", "1", "--offline-requests", "4",
                               "--batches", "1", "--rates", "1"])
    res = vs_vllm.compare_clients(args, str(checkpoint))
    by = {r["client"]: r for r in res["runs"]}
    theirs, ours = by["vllm bench serve"], by["this project's load generator"]
    assert theirs["completed"] == ours["completed"] == 12
    for m in ("ttft_ms", "tpot_ms"):
        assert theirs[m]["median"] > 0 and ours[m]["median"] > 0
        # the same server at the same load: the two clients' medians within a factor of two of each other
        assert 0.5 < theirs[m]["median"] / ours[m]["median"] < 2.0, (m, theirs[m], ours[m])
