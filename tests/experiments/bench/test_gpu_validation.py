"""The GPU validation bench: the public measurements read as the README says, replayed, reported."""

from __future__ import annotations

import json

import pytest

from experiments.bench import gpu_validation as gv


def test_the_measured_sets_are_read_with_their_caveats():
    stages = gv.stage_setups()
    assert len(stages) == 12 and {s.model for s, _ in stages} == {"llama-2-7b", "llama-2-70b"}
    for setup, row in stages:
        assert dict(setup.engine)["enable_prefix_caching"] and setup.stack == "vllm-v1"
        pts = {p.metric: p for p in gv.stage_points(setup, row)}
        want = row["derived_tpot_requested_ms"] if "7b" in setup.model else row["derived_tpot_ms"]
        assert pts["tpot_mean"].measured == pytest.approx(want / 1000)  # never the raw chunk-counted field
        assert pts["e2e_mean"].excluded == ("reasoning" in setup.name)  # the overloaded runs
    blog = gv.blog_setups()
    assert {s.name for s, _ in blog} == {"Llama-3-8B 1xA100", "Llama-3-8B 1xH100", "Llama-3-70B 4xA100",
                                         "Llama-3-70B 4xH100"}
    bounds = [p for _, pts in blog for p in pts if p.bound]
    assert bounds and all(p.metric == "ttft_mean" and not p.load.endswith("inf") for p in bounds)


def test_sharegpt_like_lengths_follow_the_posts_means_and_vllms_filter():
    p, o = gv.sharegpt_like(500, seed=0)
    assert abs(p.mean() - 202) < 3 and abs(o.mean() - 179) < 3
    assert p.min() >= 4 and p.max() <= 1024 and (p + o).max() <= 2048


def test_a_small_replay_writes_its_table_figure_and_json(tmp_path):
    assert gv.main(["--out", str(tmp_path), "--seeds", "1", "--max-requests", "150",
                    "--stacks", "matched,ideal"]) == 0
    data = json.loads((tmp_path / "validation.json").read_text())
    assert {r["stack"] for r in data["summary"]} == {"matched", "ideal"}
    e2e = [r for r in data["summary"] if r["set"] == "vllm-0.15.1-h100" and r["metric"] == "e2e_mean"]
    assert all(r["points"] == 10 and r["median_abs_error"] is not None for r in e2e)
    assert (tmp_path / "validation.png").stat().st_size > 0 and "median" in (tmp_path / "validation.md").read_text()
