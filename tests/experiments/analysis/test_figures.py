"""Figures from saved results: goodput interpolation, the partition timeline."""

from __future__ import annotations

import json

import pandas as pd
import pytest

from experiments.analysis.figures import goodput_from_curve, make_figures


def test_figures_goodput_interpolation():
    pts = pd.DataFrame({"rate": [1, 2, 4], "slo_attainment": [1.0, 0.95, 0.5]})
    assert goodput_from_curve(pts) == pytest.approx(2 + (0.95 - 0.9) / 0.45 * 2)
    assert goodput_from_curve(pd.DataFrame({"rate": [1], "slo_attainment": [0.2]})) == 0.0


def test_partition_timeline_figure(tmp_path):
    jd = tmp_path / "engine=semipd"
    jd.mkdir()
    (jd / "job.json").write_text(json.dumps({"status": "ok", "engine": "semipd", "rate": 1.0,
                                             "slo_attainment": 1.0, "p90_ttft_s": 0.1, "p90_tpot_s": 0.01,
                                             "mean_e2e_s": 1.0}))
    (jd / "partition_log.jsonl").write_text("\n".join(json.dumps(d) for d in [
        {"time_s": 0, "prefill_share": 50, "decode_share": 50}, {"time_s": 5, "prefill_share": 70, "decode_share": 50}]))
    paths = make_figures(tmp_path)
    assert any(p.endswith("partition_over_time.png") for p in paths)
