"""Hydra configs, the experiment runner, sweeps, aggregation, figures, W&B offline runs."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
from hydra import compose, initialize_config_dir
from hydra.errors import ConfigCompositionException

from experiments import conf_store

ROOT = Path(__file__).resolve().parents[2]
CONF = str(ROOT / "conf")
conf_store.register()


def _compose(overrides=()):
    with initialize_config_dir(config_dir=CONF, version_base=None):
        return compose("config", overrides=list(overrides))


@pytest.mark.parametrize("preset", sorted(p.stem for p in (ROOT / "conf" / "experiment").glob("*.yaml")))
def test_every_experiment_preset_composes(preset):
    cfg = _compose([f"experiment={preset}"])
    assert cfg.experiment.name


@pytest.mark.parametrize("group", ["engine", "model", "workload", "slo"])
def test_every_group_option_composes(group):
    for f in (ROOT / "conf" / group).glob("*.yaml"):
        cfg = _compose([f"{group}={f.stem}"])
        assert cfg[group] is not None


@pytest.mark.parametrize("override,needle", [
    ("engine.bogus=1", "engine.bogus"),
    ("workload.rate=fast", "workload.rate"),
    ("engine=nonexistent", "engine"),
    ("slo.ttft_s=[1]", "slo.ttft_s"),
])
def test_bad_overrides_fail_naming_the_key(override, needle):
    with pytest.raises(ConfigCompositionException) as e:
        _compose([override])
    text = str(e.value) + str(e.value.__cause__)
    assert needle.split(".")[-1] in text


def test_failed_job_is_recorded(tmp_path):
    from experiments.runner import run

    cfg = _compose(["experiment=single", "model=hf", f"model.path={tmp_path}/missing", "wandb.mode=disabled"])
    from experiments.launch import ServerStartError

    with pytest.raises(ServerStartError):
        run(cfg, str(tmp_path / "job"))
    job = json.loads((tmp_path / "job" / "job.json").read_text())
    assert job["status"] == "failed" and "server" in job["error"]
    assert (tmp_path / "job" / "provenance.json").is_file()


def _server_processes(marker: str) -> list[int]:
    out = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                cmd = f.read().replace(b"\0", b" ").decode(errors="replace")
            with open(f"/proc/{pid}/stat") as f:
                zombie = f.read().split()[2] == "Z"
        except OSError:
            continue
        if marker in cmd and not zombie:
            out.append(int(pid))
    return out


def test_two_job_multirun_end_to_end(tmp_path):
    results = tmp_path / "results"
    cmd = [sys.executable, "run.py", "-m", "engine=unified,unified_chunked", "workload.rate=4",
           "workload.num_requests=6", "workload.length_scale=0.1", f"results_dir={results}", "wandb.mode=offline",
           "loadgen.progress=false", "hydra.sweep.dir=" + str(results / "sweep")]
    env = {**os.environ, "WANDB_MODE": "offline"}
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    sweep = results / "sweep"
    summary = pd.read_csv(sweep / "summary.csv")
    assert sorted(summary["engine"]) == ["unified", "unified_chunked"]
    assert (summary["status"] == "ok").all() and (summary["num_errors"] == 0).all()
    req = pd.read_parquet(sweep / "requests.parquet")
    assert len(req) == 12 and {"engine", "rate", "workload.rate", "ttft_s", "tpot_s"} <= set(req.columns)
    assert (sweep / "figures" / "slo_attainment_vs_rate.png").is_file()
    runs = list(sweep.rglob("offline-run-*"))
    job_runs = [r for r in runs if r.parent.parent != sweep]
    assert len(job_runs) == 2, runs
    for jd in (sweep / j for j in summary["job"]):
        assert jd.name.startswith("engine=")  # job directories are named by their overrides
        prov = json.loads((jd / "provenance.json").read_text())
        assert prov["git_commit"] and prov["machine"]["cores"] and prov["packages"]["torch"]
    assert "unified_chunked" in proc.stdout  # the summary table on the terminal
    assert not _server_processes(str(results)), "an engine server outlived its job"

    # Figures regenerate from the saved results alone.
    shutil.rmtree(sweep / "figures")
    out = subprocess.run([sys.executable, "-m", "experiments.figures", str(sweep)], cwd=ROOT, capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert {"slo_attainment_vs_rate.png", "p90_latency_vs_rate.png", "mean_e2e_vs_rate.png",
            "goodput_per_engine.png", "slo_attainment_vs_slo_scale.png"} <= {p.name for p in (sweep / "figures").iterdir()}

    # Re-running the same sweep skips finished jobs.
    again = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300, env=env)
    assert again.returncode == 0
    assert "already finished" in again.stdout + again.stderr


def test_figures_goodput_interpolation():
    from experiments.figures import goodput_from_curve

    pts = pd.DataFrame({"rate": [1, 2, 4], "slo_attainment": [1.0, 0.95, 0.5]})
    assert goodput_from_curve(pts) == pytest.approx(2 + (0.95 - 0.9) / 0.45 * 2)
    assert goodput_from_curve(pd.DataFrame({"rate": [1], "slo_attainment": [0.2]})) == 0.0


def test_partition_timeline_figure(tmp_path):
    from experiments.figures import make_figures

    jd = tmp_path / "engine=semipd"
    jd.mkdir()
    (jd / "job.json").write_text(json.dumps({"status": "ok", "engine": "semipd", "rate": 1.0,
                                             "slo_attainment": 1.0, "p90_ttft_s": 0.1, "p90_tpot_s": 0.01,
                                             "mean_e2e_s": 1.0}))
    (jd / "partition_log.jsonl").write_text("\n".join(json.dumps(d) for d in [
        {"time_s": 0, "prefill_share": 50, "decode_share": 50}, {"time_s": 5, "prefill_share": 70, "decode_share": 50}]))
    paths = make_figures(tmp_path)
    assert any(p.endswith("partition_over_time.png") for p in paths)
