"""Model shapes without weights: the numbers a cost model needs, for public checkpoints and the CPU presets.

The public shapes are the values of each model's published ``config.json``, so the simulator can price a
70B model on a machine that could never load it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from semipd_engine.model.presets import PRESETS as _CPU_PRESETS
from semipd_engine.model.spec import SUPPORTED_MODEL_TYPES

# The built-in tokenizer's size (semipd_engine.tokenizer.BUILTIN_VOCAB_SIZE, special tokens included),
# repeated so this package needs nothing of the engine but the preset table; a test checks they agree.
BUILTIN_VOCAB_SIZE = 16384



@dataclass(frozen=True)
class ModelShape:
    name: str
    num_layers: int
    hidden_size: int
    intermediate_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int
    tie_word_embeddings: bool = False
    max_position_embeddings: int = 4096

    def __post_init__(self):
        for f in ("num_layers", "hidden_size", "intermediate_size", "num_heads", "num_kv_heads", "head_dim",
                  "vocab_size", "max_position_embeddings"):
            if getattr(self, f) < 1:
                raise ValueError(f"model shape {self.name!r}: {f} must be >= 1, got {getattr(self, f)}")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"model shape {self.name!r}: num_heads={self.num_heads} is not a multiple of "
                             f"num_kv_heads={self.num_kv_heads}")

    def layer_params(self) -> int:
        h, d = self.hidden_size, self.head_dim
        attn = h * d * (2 * self.num_heads + 2 * self.num_kv_heads)  # q, k, v, o
        return attn + 3 * h * self.intermediate_size + 2 * h  # + gate, up, down, two RMSNorm weights

    def params(self) -> int:
        """Parameter count, embeddings, LM head (unless tied) and the final norm included."""
        emb = self.vocab_size * self.hidden_size * (1 if self.tie_word_embeddings else 2)
        return self.num_layers * self.layer_params() + emb + self.hidden_size

    def weight_bytes(self, dtype_bytes: int = 2) -> int:
        return self.params() * dtype_bytes

    def kv_bytes_per_token(self, dtype_bytes: int = 2) -> int:
        return 2 * self.num_layers * self.num_kv_heads * self.head_dim * dtype_bytes

    @classmethod
    def from_hf_config(cls, path: str | Path, name: str | None = None) -> ModelShape:
        """From a local Hugging Face ``config.json`` (the file, or the checkpoint directory holding it)."""
        p = Path(path)
        if p.is_dir():
            p = p / "config.json"
        if not p.is_file():
            raise ValueError(f"model.path: no config.json at {str(p)!r}")
        cfg = json.loads(p.read_text())
        mt = cfg.get("model_type")
        if mt not in SUPPORTED_MODEL_TYPES:
            raise ValueError(f"model.path: model_type {mt!r} is not supported (supported: {SUPPORTED_MODEL_TYPES})")
        heads = cfg["num_attention_heads"]
        return cls(
            name=name or p.parent.name,
            num_layers=cfg["num_hidden_layers"],
            hidden_size=cfg["hidden_size"],
            intermediate_size=cfg["intermediate_size"],
            num_heads=heads,
            num_kv_heads=cfg.get("num_key_value_heads") or heads,
            head_dim=cfg.get("head_dim") or cfg["hidden_size"] // heads,
            vocab_size=cfg["vocab_size"],
            tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
            max_position_embeddings=cfg.get("max_position_embeddings", 4096),
        )

    @classmethod
    def preset(cls, name: str, vocab_size: int | None = None) -> ModelShape:
        """A named shape; ``vocab_size`` overrides the vocabulary of the CPU presets (built-in tokenizer's)."""
        if name in _PUBLIC:
            return _PUBLIC[name]
        if name in _CPU_PRESETS:
            p = _CPU_PRESETS[name]
            return cls(
                name=name,
                num_layers=p["num_hidden_layers"],
                hidden_size=p["hidden_size"],
                intermediate_size=p["intermediate_size"],
                num_heads=p["num_attention_heads"],
                num_kv_heads=p["num_key_value_heads"],
                head_dim=p["hidden_size"] // p["num_attention_heads"],
                vocab_size=vocab_size or BUILTIN_VOCAB_SIZE,
                tie_word_embeddings=bool(p.get("tie_word_embeddings", False)),
                max_position_embeddings=p["max_position_embeddings"],
            )
        raise ValueError(f"model.name={name!r} is not a known model shape; valid: {model_names()}")


def model_names() -> list[str]:
    return sorted([*_PUBLIC, *_CPU_PRESETS])


# Published config.json values (meta-llama/Meta-Llama-3-8B, Meta-Llama-3-70B, Llama-2-7b-hf, Qwen/Qwen2.5-7B).
_PUBLIC: dict[str, ModelShape] = {
    s.name: s
    for s in (
        ModelShape("llama3-8b", 32, 4096, 14336, 32, 8, 128, 128256, False, 8192),
        ModelShape("llama3-70b", 80, 8192, 28672, 64, 8, 128, 128256, False, 8192),
        ModelShape("llama-2-7b", 32, 4096, 11008, 32, 32, 128, 32000, False, 4096),
        ModelShape("qwen2.5-7b", 28, 3584, 18944, 28, 4, 128, 152064, False, 131072),
    )
}
