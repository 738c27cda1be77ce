"""Figures from saved results: goodput interpolation, the SLO-scale grid from the sweep's config, the
partition timeline."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from experiments.analysis import figures
from experiments.analysis.figures import goodput_from_curve, slo_scale_curves, slo_scales
from experiments.sweep.aggregate import aggregate_sweep
from experiments.sweep.config import ExperimentConfig
from tests.helpers.sweep_dir import write_job


def make_figures(sweep_dir):
    """As a sweep's end does: aggregate the jobs, then draw (the figures read what the aggregate wrote)."""
    aggregate_sweep(sweep_dir, with_points=True)
    return figures.make_figures(sweep_dir)


def test_figures_goodput_interpolation():
    pts = pd.DataFrame({"rate": [1, 2, 4], "slo_attainment": [1.0, 0.95, 0.5]})
    assert goodput_from_curve(pts) == pytest.approx(2 + (0.95 - 0.9) / 0.45 * 2)
    assert goodput_from_curve(pd.DataFrame({"rate": [1], "slo_attainment": [0.2]})) == 0.0


def test_slo_scale_grid_is_the_configured_one(tmp_path):
    write_job(tmp_path, "engine=unified", "unified", 2.0, config={"experiment": {"slo_scales": [1.0, 0.5, 2.0]}})
    assert slo_scales(tmp_path) == [0.5, 1.0, 2.0]
    # Jobs that disagree: every scale any of them asked for.
    write_job(tmp_path, "engine=semipd", "semipd", 2.0, config={"experiment": {"slo_scales": [0.5, 3.0]}})
    assert slo_scales(tmp_path) == [0.5, 1.0, 2.0, 3.0]


def test_slo_scale_grid_falls_back_to_the_default(tmp_path):
    write_job(tmp_path, "engine=unified", "unified", 2.0, config=None)  # no saved config
    assert slo_scales(tmp_path) == ExperimentConfig().slo_scales == [0.4, 0.6, 0.8, 1.0, 1.2, 1.4, 1.6]


def test_slo_scale_curves_scale_both_slos():
    # SLOs 1 s / 0.1 s; request 0 misses TPOT below scale 0.8, the others miss TTFT below their own scale.
    req = pd.DataFrame({"engine": "unified", "rate": 2.0, "status": "ok", "slo_ttft_s": 1.0, "slo_tpot_s": 0.1,
                        "ttft_s": [0.4, 0.8, 1.5, 3.0], "tpot_s": [0.08, 0.01, 0.01, None],
                        "error": [None, None, None, None]})
    curves = slo_scale_curves(req, [0.5, 1.0, 2.0, 4.0])
    assert list(curves["slo_scale"]) == [0.5, 1.0, 2.0, 4.0]
    assert list(curves["slo_attainment"]) == [0.0, 0.5, 0.75, 1.0]
    failed = req.assign(error=["HTTP 500", None, None, None])
    assert list(slo_scale_curves(failed, [4.0])["slo_attainment"]) == [0.75]  # an error meets no SLO


def test_make_figures_draws_the_slo_scale_curves_at_the_configured_scales(tmp_path, monkeypatch):
    write_job(tmp_path, "engine=unified", "unified", 2.0, ttft_s=[0.4, 0.8, 1.5, 3.0],
              config={"experiment": {"slo_scales": [0.5, 2.0]}}, slo_attainment=0.5, p90_ttft_s=2.5,
              p90_tpot_s=0.01, mean_e2e_s=1.5)
    drawn = []

    def spy(requests, scales):
        curves = slo_scale_curves(requests, scales)
        drawn.append(curves)
        return curves

    monkeypatch.setattr(figures, "slo_scale_curves", spy)
    paths = make_figures(tmp_path)
    assert str(tmp_path / "figures" / "slo_attainment_vs_slo_scale.png") in paths
    assert len(drawn) == 1 and list(drawn[0]["slo_scale"]) == [0.5, 2.0]
    assert list(drawn[0]["slo_attainment"]) == [0.25, 0.75]


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


def test_figures_from_a_saved_sweep_mark_invalid_points(tmp_path):
    """Two engines over two rates; semipd's 4 req/s run failed its validity check: it is left out of the lines,
    drawn as a grey cross, and counted in the caption; the caption names model, workload, SLOs and the
    requests behind each point."""
    for engine in ("unified", "semipd"):
        for rate in (2.0, 4.0):
            valid = not (engine == "semipd" and rate == 4.0)
            write_job(tmp_path, f"engine={engine},workload.rate={rate:g}", engine, rate, ttft_s=[0.1, 0.2, 0.3, 2.0],
                      slo_attainment=0.75, p90_ttft_s=1.5, p90_tpot_s=0.01, mean_e2e_s=1.0, request_throughput=rate,
                      num_requests=4, num_errors=0, valid=valid, client_valid=valid,
                      invalid_reasons="" if valid else "client: p99 dispatch lateness 20.0 ms > 10 ms")
    paths = make_figures(tmp_path)
    names = {p.rsplit("/", 1)[1] for p in paths}
    assert {"slo_attainment_vs_rate.png", "p90_latency_vs_rate.png", "mean_e2e_vs_rate.png",
            "goodput_per_engine.png"} <= names

    _, _, pts, _ = figures.load_sweep(tmp_path)
    assert list(pts.loc[~pts["valid"], ["engine", "rate"]].itertuples(index=False, name=None)) == [("semipd", 4.0)]
    fig = figures.attainment_figure(pts, figures.context(tmp_path, pd.read_csv(tmp_path / "summary.csv"), pts))
    caption = fig._suptitle.get_text()
    assert "model tiny" in caption and "workload synthetic" in caption and "SLO TTFT <= 1 s, TPOT <= 100 ms" in caption
    assert "4 measured requests x 1 seed(s) per point" in caption
    assert "1 of 4 point(s) have no valid run" in caption
    ax = fig.axes[0]
    crosses = [c for c in ax.collections if c.get_gid() == "invalid"]
    assert len(crosses) == 1 and crosses[0].get_offsets()[0][1] == pytest.approx(75.0)
    # The lines: one per engine, semipd's broken where its invalid point would be.
    lines = {line.get_label(): line for line in ax.get_lines() if line.get_label() in ("unified", "semipd")}
    assert np.isfinite(lines["unified"].get_ydata()).sum() == 2 and np.isfinite(lines["semipd"].get_ydata()).sum() == 1
    figures.plt.close(fig)


def test_a_point_whose_run_did_not_reach_steady_state_is_drawn_hollow(tmp_path):
    for rate, steady in ((2.0, True), (4.0, False)):
        write_job(tmp_path, f"engine=unified,workload.rate={rate:g}", "unified", rate, ttft_s=[0.1, 0.2, 0.3, 2.0],
                  slo_attainment=0.75, p90_ttft_s=1.5, p90_tpot_s=0.01, mean_e2e_s=1.0, request_throughput=rate,
                  num_requests=4, num_errors=0, valid=True, steady_state=steady, backlog_growth=0.1 if steady else 9.0)
    aggregate_sweep(tmp_path)
    _, _, pts, _ = figures.load_sweep(tmp_path)  # through summary.csv, where the flag is text
    assert list(pts.sort_values("rate")["steady_state"]) == [True, False]
    assert list(pts.sort_values("rate")["backlog_growth"]) == [0.1, 9.0]
    fig = figures.latency_figure(pts, "caption")
    for ax in fig.axes:
        hollow = [c for c in ax.collections if c.get_gid() == "unsteady"]
        assert len(hollow) == 1 and hollow[0].get_offsets()[0][0] == pytest.approx(4.0, abs=0.5)
    assert "no steady state (backlog still growing)" in [t.get_text() for t in fig.legends[0].get_texts()]
    figures.plt.close(fig)
    # Older sweeps say nothing: no hollow point, no legend entry.
    fig = figures.attainment_figure(pts.drop(columns=["steady_state"]), "caption")
    assert not [c for c in fig.axes[0].collections if c.get_gid() == "unsteady"]
    assert "no steady state (backlog still growing)" not in [t.get_text() for t in fig.legends[0].get_texts()]
    figures.plt.close(fig)


def test_fixing_the_ticks_before_saving_changes_no_pixel(tmp_path, monkeypatch):
    """`_save` fixes every axis' ticks after the layout's draw: the PNG is the one drawn without that (linear,
    log, shared and offset axes, a constrained layout)."""
    import matplotlib.pyplot as plt

    def draw():
        fig, axes = plt.subplots(2, 2, figsize=(6, 4), sharex="col", layout="constrained")
        x = np.linspace(1, 50, 40)
        axes[0, 0].plot(x, x ** 3)
        axes[0, 0].set_yscale("log")
        axes[1, 0].plot(x, 1e6 + x)  # an offset on the y axis
        axes[0, 1].step(x, np.sin(x), where="post")
        axes[1, 1].bar(x, np.cos(x) ** 2, width=0.8)
        axes[1, 1].set_xscale("log")
        fig.suptitle("ticks")
        return fig

    figures._save(draw(), tmp_path / "fixed", "f")
    monkeypatch.setattr(figures, "_freeze_ticks", lambda fig: None)
    figures._save(draw(), tmp_path / "free", "f")
    assert (tmp_path / "fixed" / "f.png").read_bytes() == (tmp_path / "free" / "f.png").read_bytes()
