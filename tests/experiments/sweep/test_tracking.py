"""W&B tracking: summaries flatten to scalar keys; disabled mode touches nothing."""

from __future__ import annotations

import pandas as pd

from experiments.sweep.config import WandbConfig
from experiments.sweep.tracking import flatten, log_job, log_sweep
from semipd_engine.config import freeze


def test_flatten():
    summary = {"status": "ok", "rate": 2.0, "valid": True, "error": None, "num": 3,
               "aggregates": {"ttft_s": {"p50": 0.1, "p90": 0.3}, "goodput": 1.5, "empty": {}},
               "overrides": {"engine": "unified"}, "probes": [{"rate": 1.0}], "reasons": ["late"]}
    assert flatten(summary) == {"status": "ok", "rate": 2.0, "valid": True, "error": None, "num": 3,
                                "aggregates/ttft_s/p50": 0.1, "aggregates/ttft_s/p90": 0.3,
                                "aggregates/goodput": 1.5, "overrides/engine": "unified"}
    assert flatten({"a": {"b": 1}}, prefix="job/") == {"job/a/b": 1}


def test_disabled_mode_logs_nothing(tmp_path):
    off = freeze(WandbConfig, {"mode": "disabled"})
    assert log_job(off, str(tmp_path), "job", "sweep", "unified", {}, {"status": "ok"}, None) is None
    assert log_sweep(off, str(tmp_path), pd.DataFrame({"engine": ["unified"]}), []) is None
    assert not any(tmp_path.iterdir())
