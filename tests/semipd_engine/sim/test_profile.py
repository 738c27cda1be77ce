"""The `profile` cost model: measured on the real runner, fitted, and modelling the machine it was measured on."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from semipd_engine.config import EngineConfig, ModelConfig, freeze
from semipd_engine.sim.batch import BatchShape
from semipd_engine.sim.config import BackendConfig
from semipd_engine.sim.profile import Profile

ROOT = Path(__file__).resolve().parents[3]


@pytest.fixture(scope="module")
def profile_path(tmp_path_factory):
    out = tmp_path_factory.mktemp("profile") / "tiny.json"
    subprocess.run([sys.executable, "-m", "semipd_engine.sim.profile", "--model", "tiny", "--threads", "1",
                    "--repeats", "1", "--out", str(out)], cwd=ROOT, check=True, capture_output=True, timeout=300)
    return out


def test_profile_fits_the_real_runner_and_grows_with_work(profile_path):
    p = Profile.load(profile_path)
    assert p.thread_counts == [1]
    m = p.cost_model(1)
    small = m.iteration_time(BatchShape(decode_seqs=1, decode_ctx_tokens=32, sampled=1))
    big = m.iteration_time(BatchShape(decode_seqs=32, decode_ctx_tokens=32 * 256, sampled=32))
    assert 0 < small < big


def test_a_profile_simulation_models_the_profiled_machine_not_its_own_cores(profile_path, tmp_path):
    from semipd_engine.sim.build import cpu_platform

    data = json.loads(profile_path.read_text())
    data["machine"]["cores"] = 1  # measured on a 1-core machine; this test runs with 2 or more
    one = tmp_path / "one_core.json"
    one.write_text(json.dumps(data))
    plat = cpu_platform(freeze(ModelConfig, {"name": "tiny"}), freeze(EngineConfig, {"name": "semipd"}),
                        freeze(BackendConfig, {"name": "sim", "cost_model": "profile", "profile_path": str(one)}))
    assert plat.devices == 1 == Profile.load(one).cores
