"""Architecture description of a Llama-family checkpoint, read from a HF config.

Covers Llama 2/3 and Qwen2: GQA, SwiGLU, RMSNorm, RoPE (default, linear and
Llama-3 scaling), tied or untied embeddings, and Qwen2's q/k/v biases.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

SUPPORTED_MODEL_TYPES = ("llama", "qwen2", "mistral")


@dataclass(frozen=True)
class ModelSpec:
    """One model's architecture: what the real model is built from and what the simulator prices (its model
    shapes, `sim/shapes.py`, are this type with constructors for published configs and the CPU presets)."""

    model_type: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    max_position_embeddings: int
    tie_word_embeddings: bool
    qkv_bias: bool
    rope_scaling: Optional[dict[str, Any]] = None
    bos_token_id: Optional[int] = None
    eos_token_ids: tuple[int, ...] = field(default_factory=tuple)
    name: str = ""  # what messages call it (a preset's name, a checkpoint's folder)

    def __post_init__(self) -> None:
        for f in ("num_layers", "hidden_size", "intermediate_size", "num_heads", "num_kv_heads", "head_dim",
                  "vocab_size", "max_position_embeddings"):
            if getattr(self, f) < 1:
                raise ValueError(f"model {self.name or self.model_type!r}: {f} must be >= 1, got {getattr(self, f)}")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"model {self.name or self.model_type!r}: num_heads={self.num_heads} is not a multiple "
                             f"of num_kv_heads={self.num_kv_heads}")

    @classmethod
    def from_hf_config(cls, cfg: Any, name: str = "") -> ModelSpec:
        """From a transformers config object, or a `config.json`'s dict."""
        get = cfg.get if isinstance(cfg, dict) else (lambda key, default=None: getattr(cfg, key, default))
        model_type = get("model_type")
        if model_type not in SUPPORTED_MODEL_TYPES:
            raise ValueError(
                f"model_type {model_type!r} is not supported (supported: {SUPPORTED_MODEL_TYPES})"
            )
        # transformers >=5 keeps rope settings in `rope_parameters`; older configs
        # have `rope_theta` + `rope_scaling`.
        rope = dict(get("rope_parameters") or {})
        theta = rope.pop("rope_theta", None) or get("rope_theta") or 10000.0
        scaling = rope or get("rope_scaling")
        if scaling and scaling.get("rope_type", scaling.get("type")) in (None, "default"):
            scaling = None
        num_heads = get("num_attention_heads")
        head_dim = get("head_dim") or get("hidden_size") // num_heads
        eos = get("eos_token_id")
        eos_ids = tuple(eos) if isinstance(eos, (list, tuple)) else ((eos,) if eos is not None else ())
        return cls(
            model_type=model_type,
            vocab_size=get("vocab_size"),
            hidden_size=get("hidden_size"),
            intermediate_size=get("intermediate_size"),
            num_layers=get("num_hidden_layers"),
            num_heads=num_heads,
            num_kv_heads=get("num_key_value_heads") or num_heads,
            head_dim=head_dim,
            rms_norm_eps=get("rms_norm_eps") or 1e-6,
            rope_theta=float(theta),
            max_position_embeddings=get("max_position_embeddings") or 4096,
            tie_word_embeddings=bool(get("tie_word_embeddings", False)),
            qkv_bias=model_type == "qwen2" or bool(get("attention_bias", False)),
            rope_scaling=dict(scaling) if scaling else None,
            bos_token_id=get("bos_token_id"),
            eos_token_ids=eos_ids,
            name=name,
        )

    def layer_params(self) -> int:
        h, d = self.hidden_size, self.head_dim
        attn = h * d * (2 * self.num_heads + 2 * self.num_kv_heads)  # q, k, v, o
        return attn + 3 * h * self.intermediate_size + 2 * h  # + gate, up, down, two RMSNorm weights

    def params(self) -> int:
        """Parameter count, embeddings, LM head (unless tied) and the final norm included."""
        emb = self.vocab_size * self.hidden_size * (1 if self.tie_word_embeddings else 2)
        return self.num_layers * self.layer_params() + emb + self.hidden_size

    num_params = params

    def weight_bytes(self, dtype_bytes: int = 2) -> int:
        return self.params() * dtype_bytes

    def kv_bytes_per_token(self, dtype_bytes: int = 2) -> int:
        return 2 * self.num_layers * self.num_kv_heads * self.head_dim * dtype_bytes
