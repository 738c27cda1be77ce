"""A preset saved as a Hugging Face checkpoint is the same model: here under model=hf, and in transformers."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from semipd_engine.config import EngineConfig, ModelConfig, freeze
from semipd_engine.core.request import SamplingParams
from semipd_engine.runtime.factory import build_core


def test_an_exported_preset_serves_the_same_tokens_and_loads_in_transformers(tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from semipd_engine.model.export import export

    info = export("tiny", str(tmp_path / "tiny"), seed=3)
    assert info["head_dim"] == 32 and info["vllm_cpu_head_size_ok"] and info["params"] > 0
    engine = freeze(EngineConfig, {"num_kv_blocks": 64})
    prompts = [[5, 17, 300, 41, 9], [1000, 2, 3]]
    greedy = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)
    preset = build_core(freeze(ModelConfig, {"name": "tiny", "seed": 3, "dtype": "float32"}), engine)
    saved = build_core(freeze(ModelConfig, {"path": str(tmp_path / "tiny"), "dtype": "float32"}), engine)
    assert preset.generate(prompts, greedy) == saved.generate(prompts, greedy)
    # transformers reads the same directory: same greedy continuation, and the tokenizer with its chat template
    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "tiny", torch_dtype=torch.float32).eval()
    with torch.no_grad():
        out = hf.generate(torch.tensor([prompts[0]]), max_new_tokens=8, do_sample=False)
    assert out[0, len(prompts[0]):].tolist() == preset.generate(prompts[:1], greedy)[0]
    tok = AutoTokenizer.from_pretrained(tmp_path / "tiny")
    assert tok.chat_template and len(tok) == json.loads((tmp_path / "tiny" / "config.json").read_text())["vocab_size"]


def test_the_export_command_refuses_an_unknown_preset(tmp_path):
    r = subprocess.run([sys.executable, "-m", "semipd_engine.model.export", "no-such-model", str(tmp_path / "x")],
                       capture_output=True, text=True)
    assert r.returncode == 2 and "no-such-model" in r.stderr and "tiny" in r.stderr


@pytest.mark.parametrize("dtype", ["bfloat16"])
def test_an_export_keeps_the_dtype_asked_for(tmp_path, dtype):
    from safetensors import safe_open

    from semipd_engine.model.export import export

    export("tiny", str(tmp_path / "t"), dtype=dtype)
    with safe_open(str(tmp_path / "t" / "model.safetensors"), "pt") as f:
        assert {f.get_tensor(k).dtype for k in f.keys()} == {torch.bfloat16}
    cfg = json.loads((tmp_path / "t" / "config.json").read_text())
    assert cfg.get("dtype", cfg.get("torch_dtype")) == "bfloat16"
