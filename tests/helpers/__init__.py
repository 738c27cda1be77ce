"""Helpers shared by the test modules: configs, random HF checkpoints, the transformers reference.

Test modules import from here (never from each other); fixtures live in tests/conftest.py.
"""

from __future__ import annotations

import asyncio
import json
import os

from semipd_engine.config import EngineConfig, ModelConfig, freeze

PROMPT_LENS = [5, 17, 33, 1, 48, 9]


def model_cfg(path=None, **kw):
    return freeze(ModelConfig, {"path": path, **kw})


def engine_cfg(**kw):
    return freeze(EngineConfig, {"kv_cache_mb": 16, **kw})


def make_checkpoint(path, model_type: str, seed: int = 0, **overrides) -> str:
    """A random transformers model saved in the HF layout, with the built-in tokenizer."""
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig, Qwen2Config

    from semipd_engine.serving.tokenizer import builtin_tokenizer

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


def prompts(vocab: int, seed: int = 1):
    import torch

    g = torch.Generator().manual_seed(seed)
    return [torch.randint(10, vocab, (n,), generator=g).tolist() for n in PROMPT_LENS]


_HF: dict = {}


def hf_model(path):
    import torch
    from transformers import AutoModelForCausalLM

    if path not in _HF:
        _HF[path] = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    return _HF[path]


def hf_greedy(path, prompt, max_new):
    """transformers' greedy continuation: the reference every engine must reproduce."""
    import torch

    out = hf_model(path).generate(torch.tensor([prompt]), max_new_tokens=max_new, do_sample=False,
                                  min_new_tokens=max_new, pad_token_id=0, eos_token_id=None)
    return out[0, len(prompt):].tolist()


def engine_vocab(path) -> int:
    with open(os.path.join(path, "config.json")) as f:
        return json.load(f)["vocab_size"]


async def stream_greedy(engine, ps, max_tokens, prefix: str = "r", timeout: float = 120):
    """Greedy outputs of prompts `ps` on a started engine client, each streamed to its end without an error."""
    from semipd_engine.core.request import Request, SamplingParams

    streams = [engine.add(Request(f"{prefix}{i}", p, SamplingParams(max_tokens=max_tokens, temperature=0.0,
                                                                     ignore_eos=True))) for i, p in enumerate(ps)]
    outs = []
    for s in streams:
        toks = []
        while True:
            o = await asyncio.wait_for(s.get(), timeout)
            assert o.error is None, o.error
            toks += o.new_token_ids
            if o.finished:
                break
        outs.append(toks)
    return outs


async def generate_through(engine, ps, max_tokens):
    """Start an engine client, stream greedy outputs for prompts `ps`, shut it down; returns the outputs."""
    await engine.start(120)
    try:
        outs = await stream_greedy(engine, ps, max_tokens)
        await asyncio.sleep(0.3)  # let the idle workers publish their last pool snapshot
        return outs
    finally:
        await engine.shutdown()
