"""Named model shapes built with seeded random weights (no download, ever).

`tiny` keeps the default sweep to minutes on 2 CPU cores; `llama-100m` is the
benchmark size (~100M parameters); the `-qwen2` variants exercise q/k/v biases
and tied embeddings. The vocabulary is the built-in tokenizer's, so every id the
model can emit decodes to text.
"""

from __future__ import annotations

from typing import Any

PRESETS: dict[str, dict[str, Any]] = {
    "tiny": dict(
        model_type="llama", hidden_size=128, intermediate_size=352, num_hidden_layers=4,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096,
        rope_theta=10000.0,
    ),
    "tiny-qwen2": dict(
        model_type="qwen2", hidden_size=128, intermediate_size=352, num_hidden_layers=4,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096,
        rope_theta=1000000.0, tie_word_embeddings=True,
    ),
    "llama-100m": dict(
        model_type="llama", hidden_size=768, intermediate_size=2048, num_hidden_layers=16,
        num_attention_heads=12, num_key_value_heads=4, max_position_embeddings=4096,
        rope_theta=500000.0,
    ),
}


def preset_hf_config(name: str, vocab_size: int, bos_token_id: int, eos_token_id: int):
    """A transformers config object for preset ``name``."""
    from transformers import LlamaConfig, Qwen2Config

    if name not in PRESETS:
        raise ValueError(f"unknown model preset {name!r}; known: {sorted(PRESETS)}")
    kw = dict(PRESETS[name])
    cls = {"llama": LlamaConfig, "qwen2": Qwen2Config}[kw.pop("model_type")]
    kw.setdefault("tie_word_embeddings", False)
    return cls(
        vocab_size=vocab_size, bos_token_id=bos_token_id, eos_token_id=eos_token_id,
        rms_norm_eps=1e-6, initializer_range=0.02, **kw,
    )
