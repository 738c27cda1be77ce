"""Workload length reports, and the warning for ShareGPT-style files counted with an unrealistic tokenizer."""

import json

from experiments.loadgen.lengths import describe, report, sharegpt_reference
from experiments.loadgen.workloads import load_workload
from semipd_engine.serving.tokenizer import builtin_tokenizer
from tests.helpers.experiment_configs import workload_cfg

PROMPT = ("Could you explain, in a few plain sentences, why a long prompt makes the other users of a serving "
          "engine wait, and what the engine can do about it without buying more hardware?")
ANSWER = ("When a long prompt arrives, the engine spends one large step reading it, and every answer that was "
          "being written waits for that step to finish. Splitting the prompt into chunks, or giving the two kinds "
          "of work their own share of the device, keeps the answers flowing at a steady pace.")


class CharTokenizer:
    """One token per character: the kind of tokenizer whose lengths are far from a real model's."""

    def encode(self, text, add_special_tokens=True):
        return list(range(len(text)))


def sharegpt_file(tmp_path, n=20):
    conv = {"conversations": [{"from": "human", "value": PROMPT}, {"from": "gpt", "value": ANSWER}]}
    p = tmp_path / "sg.json"
    p.write_text(json.dumps([conv] * n))
    return str(p)


def test_lengths_are_described_for_every_workload():
    stats = describe(load_workload(workload_cfg(name="fixed", prompt_len=64, output_len=16, num_requests=10)))
    assert stats["n"] == 10 and stats["prompt_tokens"]["mean"] == 64 and stats["output_tokens"]["p90"] == 16
    assert "chars_per_token" not in stats  # no text: nothing to say about compression


def test_builtin_tokenizer_on_real_text_gives_no_compression_warning(tmp_path):
    cfg = workload_cfg(name="sharegpt", path=sharegpt_file(tmp_path), num_requests=20)
    out = report(load_workload(cfg, builtin_tokenizer()), cfg, "builtin")
    ref = sharegpt_reference()["chars_per_token"]
    assert 0.75 < out["chars_per_token"]["prompt"] / ref["prompt"] < 4 / 3
    assert not [w for w in out["warnings"] if "characters per token" in w], out["warnings"]


def test_an_unrealistic_tokenizer_is_warned_about_with_the_ratio_and_the_fix(tmp_path, caplog):
    cfg = workload_cfg(name="sharegpt", path=sharegpt_file(tmp_path), num_requests=20, max_total_len=100000,
                       max_prompt_len=100000)
    with caplog.at_level("WARNING"):
        out = report(load_workload(cfg, CharTokenizer()), cfg, "chars")
    assert out["chars_per_token"] == {"prompt": 1.0, "output": 1.0}
    cpt = [w for w in out["warnings"] if "characters per token" in w]
    assert len(cpt) == 2 and "loadgen.tokenizer=DIR" in cpt[0] and "~4.1x as long" in cpt[0]
    assert "characters per token" in caplog.text


def test_mean_lengths_are_compared_to_the_reference_under_the_paper_filter(tmp_path):
    cfg = workload_cfg(name="sharegpt", path=sharegpt_file(tmp_path), num_requests=20)  # the paper's filter
    out = report(load_workload(cfg, builtin_tokenizer()), cfg, "builtin")
    # These prompts (~40 tokens) are far shorter than ShareGPT's first turns (~105 under Llama 3).
    assert any(w.startswith("mean prompt length") for w in out["warnings"]), out["warnings"]
