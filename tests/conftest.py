"""Shared fixtures: small HF checkpoints written to disk, engine configs."""

from __future__ import annotations

import os

os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402
import torch  # noqa: E402

from semipd_engine.config import EngineConfig, ModelConfig, freeze  # noqa: E402

torch.set_num_threads(1)


def make_checkpoint(path, model_type: str, seed: int = 0, **overrides) -> str:
    """A random transformers model saved in the HF layout, with the built-in tokenizer."""
    from transformers import AutoModelForCausalLM, LlamaConfig, Qwen2Config

    from semipd_engine.tokenizer import builtin_tokenizer

    tok = builtin_tokenizer()
    kw = dict(vocab_size=len(tok), hidden_size=64, intermediate_size=160, num_hidden_layers=2,
              num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
              bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, initializer_range=0.1)
    if model_type == "llama":
        kw.update(rope_theta=500000.0, rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                                     "high_freq_factor": 4.0, "original_max_position_embeddings": 128})
        cfg = LlamaConfig(**{**kw, **overrides})
    else:
        cfg = Qwen2Config(**{**kw, "tie_word_embeddings": True, **overrides})
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(cfg).eval()
    if model_type == "qwen2":  # biases are zero-initialised; make them matter
        with torch.no_grad():
            for layer in model.model.layers:
                for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
                    proj.bias.normal_(0, 0.1)
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return str(path)


@pytest.fixture(scope="session", params=["llama", "qwen2"])
def hf_checkpoint(request, tmp_path_factory):
    return make_checkpoint(tmp_path_factory.mktemp(request.param), request.param)


@pytest.fixture(scope="session")
def llama_checkpoint(tmp_path_factory):
    return make_checkpoint(tmp_path_factory.mktemp("llama"), "llama")


def model_cfg(path=None, **kw):
    return freeze(ModelConfig, {"path": path, **kw})


def engine_cfg(**kw):
    return freeze(EngineConfig, {"kv_cache_mb": 16, **kw})
