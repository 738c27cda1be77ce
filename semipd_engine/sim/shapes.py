"""Model shapes without weights: the numbers a cost model needs, for public checkpoints and the CPU presets.

The public shapes are the values of each model's published ``config.json``, so the simulator can price a
70B model on a machine that could never load it.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from semipd_engine.model.presets import PRESETS as _CPU_PRESETS
from semipd_engine.model.spec import ModelSpec

# The built-in tokenizer's size (semipd_engine.serving.tokenizer.BUILTIN_VOCAB_SIZE, special tokens included),
# repeated so this package needs nothing of the engine but the preset table; a test checks they agree.
BUILTIN_VOCAB_SIZE = 16384



class ModelShape(ModelSpec):
    """The simulator's constructors of the one model type (`ModelSpec`): a published shape, a CPU preset with the
    built-in tokenizer's vocabulary, or a local `config.json` parsed by `ModelSpec.from_hf_config`."""

    @classmethod
    def from_hf_config(cls, path: Any, name: str | None = None) -> ModelShape:
        """From a local Hugging Face ``config.json`` (the file, or the checkpoint directory holding it); a config
        object or dict is parsed as `ModelSpec.from_hf_config` parses it."""
        if not isinstance(path, (str, Path)):
            return super().from_hf_config(path, name=name or "")
        p = Path(path)
        if p.is_dir():
            p = p / "config.json"
        if not p.is_file():
            raise ValueError(f"model.path: no config.json at {str(p)!r}")
        try:
            return super().from_hf_config(json.loads(p.read_text()), name=name or p.parent.name)
        except ValueError as e:
            raise ValueError(f"model.path: {e}") from None

    @classmethod
    def preset(cls, name: str, vocab_size: int | None = None) -> ModelShape:
        """A named shape; ``vocab_size`` overrides the vocabulary of the CPU presets (built-in tokenizer's)."""
        if name in _PUBLIC:
            return _PUBLIC[name]
        if name in _CPU_PRESETS:
            p = _CPU_PRESETS[name]
            return super().from_hf_config({**p, "vocab_size": vocab_size or BUILTIN_VOCAB_SIZE}, name=name)
        raise ValueError(f"model.name={name!r} is not a known model shape; valid: {model_names()}")


def _public(name, model_type, layers, hidden, inter, heads, kv_heads, vocab, max_pos, qkv_bias=False) -> ModelShape:
    return ModelShape(model_type=model_type, vocab_size=vocab, hidden_size=hidden, intermediate_size=inter,
                      num_layers=layers, num_heads=heads, num_kv_heads=kv_heads, head_dim=hidden // heads,
                      rms_norm_eps=1e-5, rope_theta=500000.0, max_position_embeddings=max_pos,
                      tie_word_embeddings=False, qkv_bias=qkv_bias, name=name)


def model_names() -> list[str]:
    return sorted([*_PUBLIC, *_CPU_PRESETS])


# Published config.json values (meta-llama/Meta-Llama-3-8B, Meta-Llama-3-70B, Llama-2-7b-hf, Llama-2-70b-hf,
# Qwen/Qwen2.5-7B): the
# numbers a cost model reads (norm epsilon and RoPE base are not priced).
_PUBLIC: dict[str, ModelShape] = {
    s.name: s
    for s in (
        _public("llama3-8b", "llama", 32, 4096, 14336, 32, 8, 128256, 8192),
        _public("llama3-70b", "llama", 80, 8192, 28672, 64, 8, 128256, 8192),
        _public("llama-2-7b", "llama", 32, 4096, 11008, 32, 32, 32000, 4096),
        _public("llama-2-70b", "llama", 80, 8192, 28672, 64, 8, 32000, 4096),
        _public("qwen2.5-7b", "qwen2", 28, 3584, 18944, 28, 4, 152064, 131072, qkv_bias=True),
    )
}
