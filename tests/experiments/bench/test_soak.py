"""The soak (experiments/bench/soak.py): mixed, aborted and hostile requests, a tiny pool, partition switches;
nothing lost, duplicated or leaked. A short run per default; the full one (every engine, worker kills) is slow."""

from __future__ import annotations

import pytest

from experiments.bench.soak import ENGINES, soak_engine


def test_short_soak(tmp_path):
    # semi-PD: the engine with the most moving parts (two workers, hand-offs, one shared pool, switches)
    res = soak_engine("semipd", 300, 12, seed=1, job_dir=str(tmp_path))
    assert not res["problems"], "\n".join(res["problems"][:20])
    assert res["kinds"]["bad"] and res["client_aborts"] and res["finish_reasons"].get("abort")
    assert res["partition_switches"] > 0 and res["preemptions"] > 0
    assert res["prefix_cache_hits"] > 0  # blocks were shared, and every reference came back (no leak above)


@pytest.mark.slow
@pytest.mark.parametrize("engine", list(ENGINES))
def test_full_soak_with_worker_kills(engine, tmp_path):
    res = soak_engine(engine, 2000, 24, seed=7, kill=2, job_dir=str(tmp_path))
    assert not res["problems"], "\n".join(res["problems"][:20])
    assert res["worker_restarts"] == 2 and res["preemptions"] > 0
