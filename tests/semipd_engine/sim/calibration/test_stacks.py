"""The serving-stack presets: the derivation reproduces the committed JSON, and every preset is sane."""

from __future__ import annotations

import json
import re

import pytest

from semipd_engine.sim.calibration import stacks

NAMES = ("ideal", "generic", "vllm-0.2", "vllm-0.6", "vllm-0.6-multistep", "vllm-v1", "sglang-0.4",
         "distserve", "semipd")
COMMITTED = json.loads(stacks.OUT.read_text())


def test_the_script_reproduces_the_committed_json_apart_from_the_date():
    fresh = json.loads(stacks.dumps(stacks.derive(COMMITTED["provenance"]["date"])))
    assert fresh == COMMITTED
    assert stacks.dumps(COMMITTED) == stacks.OUT.read_text()  # and in the committed layout


def test_the_main_entry_point_writes_the_same_stacks(tmp_path, capsys):
    out = tmp_path / "stacks.json"
    stacks.main(["--out", str(out), "--report"])
    written = json.loads(out.read_text())
    assert written["stacks"] == COMMITTED["stacks"]
    assert written["provenance"]["command"] == stacks.COMMAND
    assert "vidur-cpu-overheads" in capsys.readouterr().out


def test_every_preset_has_every_field_with_sane_values():
    presets = COMMITTED["stacks"]
    assert set(presets) == set(NAMES)
    for name, p in presets.items():
        for f in ("request_s", "step_s", "per_seq_s", "per_token_s"):
            assert isinstance(p[f], float) and 0.0 <= p[f] < 0.1, (name, f)
        assert isinstance(p["overlap"], bool), name
        assert isinstance(p["multistep"], int) and not isinstance(p["multistep"], bool) and p["multistep"] >= 1
        assert p["derivation"] and set(p["assumed"]) <= set(stacks.FIELDS), name
        assert set(p["sources"]) <= set(COMMITTED["provenance"]["sources"]), name
        if name not in ("ideal", "generic"):
            assert p["sources"], name


def test_every_source_is_cited_by_repository_commit_and_path_or_url():
    for key, src in COMMITTED["provenance"]["sources"].items():
        assert src["what"], key
        assert "url" in src or {"repository", "commit", "path"} <= set(src), key
        if "commit" in src:
            assert len(src["commit"]) == 40, key
    assert not re.search(r"(?<![\w.])/(?:work|tmp|home)/", stacks.OUT.read_text())  # no machine paths


def test_ideal_is_all_zero_and_generic_is_the_old_uniform_millisecond():
    ideal, generic = COMMITTED["stacks"]["ideal"], COMMITTED["stacks"]["generic"]
    assert {f: ideal[f] for f in stacks.FIELDS} == {"request_s": 0.0, "step_s": 0.0, "per_seq_s": 0.0,
                                                     "per_token_s": 0.0, "overlap": False, "multistep": 1}
    assert {f: generic[f] for f in stacks.FIELDS} == {"request_s": 0.0, "step_s": 0.001, "per_seq_s": 0.0,
                                                       "per_token_s": 0.0, "overlap": False, "multistep": 1}


def test_the_vllm_02_line_reproduces_vidurs_rows_within_the_stated_tolerance():
    p = COMMITTED["stacks"]["vllm-0.2"]
    assert stacks.VIDUR_TOLERANCE <= 0.05
    for row in stacks.VIDUR_LLAMA2_7B_A100:
        measured = stacks.vidur_total_ms(row) * 1e-3
        fitted = p["step_s"] + (p["per_seq_s"] + p["per_token_s"]) * row[0]
        assert fitted == pytest.approx(measured, rel=stacks.VIDUR_TOLERANCE), row[0]
    # the public summary of the same file: about 1.4 / 2.4 / 4.1 / 7.2 ms at batch 8 / 32 / 64 / 128
    for batch, ms in ((8, 1.4), (32, 2.4), (64, 4.1), (128, 7.2)):
        assert p["step_s"] + (p["per_seq_s"] + p["per_token_s"]) * batch == pytest.approx(ms * 1e-3, rel=0.06)


def test_the_stack_relations_the_derivation_claims():
    s = COMMITTED["stacks"]
    assert s["vllm-0.6-multistep"]["multistep"] == 10
    assert {f: s["vllm-0.6-multistep"][f] for f in stacks.FIELDS if f != "multistep"} == \
        {f: s["vllm-0.6"][f] for f in stacks.FIELDS if f != "multistep"}
    assert s["sglang-0.4"]["overlap"] and s["semipd"]["overlap"]
    assert not any(s[n]["overlap"] for n in ("vllm-0.2", "vllm-0.6", "vllm-v1", "distserve"))
    # BLIS's terms, transcribed
    assert s["vllm-v1"]["request_s"] == pytest.approx(15.5632e-3, rel=1e-3)
    assert s["vllm-v1"]["step_s"] == pytest.approx((126.024825 + 45.907545) * 1e-6, rel=1e-3)
    assert s["vllm-v1"]["per_seq_s"] == pytest.approx(4.41684444e-6, rel=1e-3)
    # the SGLang line passes through both measurements it was drawn from
    line = stacks.sglang_line()
    for b, h in ((line["b1"], line["h1_s"]), (line["b2"], line["h2_s"])):
        assert s["sglang-0.4"]["step_s"] + s["sglang-0.4"]["per_seq_s"] * b == pytest.approx(h, rel=1e-3)
    # v0.5.3's light-load engine host time agrees with RFC #6854's ~4 ms bubble
    assert stacks.V053_SCHED_SHARE * stacks.V053_LIGHT_TOKEN_MS == pytest.approx(stacks.RFC6854_BUBBLE_MS, rel=0.1)


def test_the_simulator_loads_every_preset():
    from semipd_engine.sim.stack import preset

    for name in NAMES:
        s = preset(name)
        assert s.name == name and s.multistep >= 1
