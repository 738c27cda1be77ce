"""Build a model from a local HF directory or a named preset with seeded random weights.

Both paths go through one HF-named state dict, so a preset can be exported
(`save_checkpoint`) and read back by transformers or by this loader unchanged.
Nothing here touches the network.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

import torch

from semipd_engine.model.attention import get_attention_backend
from semipd_engine.model.llama import LlamaForCausalLM
from semipd_engine.model.rope import RotaryEmbedding
from semipd_engine.model.spec import ModelSpec

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def torch_dtype(name: str, device: str = "cpu") -> torch.dtype:
    """The torch dtype of `model.dtype`; `auto` is resolved for `device` (semipd_engine/model/dtype.py)."""
    if name == "auto":
        from semipd_engine.model.dtype import choose

        name = choose(name, device).dtype
    if name not in DTYPES:
        raise ValueError(f"model.dtype must be auto or one of {sorted(DTYPES)}, got {name!r}")
    return DTYPES[name]


def load_hf_config(path: str):
    from transformers import AutoConfig

    if not (Path(path) / "config.json").is_file():
        raise FileNotFoundError(f"model.path={path!r}: no config.json there")
    return AutoConfig.from_pretrained(path, local_files_only=True)


def read_safetensors(path: str) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    files = sorted(Path(path).glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"model.path={path!r}: no *.safetensors files")
    state: dict[str, torch.Tensor] = {}
    for f in files:
        state.update(load_file(str(f)))
    return state


def random_state_dict(spec: ModelSpec, seed: int, std: float = 0.02) -> dict[str, torch.Tensor]:
    """HF-named weights drawn from N(0, std) with a fixed generator (norms = 1)."""
    g = torch.Generator().manual_seed(seed)
    h, i, d = spec.hidden_size, spec.intermediate_size, spec.head_dim

    def normal(*shape):
        return torch.randn(*shape, generator=g) * std

    sd = {"model.embed_tokens.weight": normal(spec.vocab_size, h), "model.norm.weight": torch.ones(h)}
    for n in range(spec.num_layers):
        p = f"model.layers.{n}."
        sd[p + "self_attn.q_proj.weight"] = normal(spec.num_heads * d, h)
        sd[p + "self_attn.k_proj.weight"] = normal(spec.num_kv_heads * d, h)
        sd[p + "self_attn.v_proj.weight"] = normal(spec.num_kv_heads * d, h)
        if spec.qkv_bias:
            sd[p + "self_attn.q_proj.bias"] = normal(spec.num_heads * d)
            sd[p + "self_attn.k_proj.bias"] = normal(spec.num_kv_heads * d)
            sd[p + "self_attn.v_proj.bias"] = normal(spec.num_kv_heads * d)
        sd[p + "self_attn.o_proj.weight"] = normal(h, spec.num_heads * d)
        sd[p + "mlp.gate_proj.weight"] = normal(i, h)
        sd[p + "mlp.up_proj.weight"] = normal(i, h)
        sd[p + "mlp.down_proj.weight"] = normal(h, i)
        sd[p + "input_layernorm.weight"] = torch.ones(h)
        sd[p + "post_attention_layernorm.weight"] = torch.ones(h)
    if not spec.tie_word_embeddings:
        sd["lm_head.weight"] = normal(spec.vocab_size, h)
    return sd


_FUSED = {"q_proj": ("qkv_proj", 0), "k_proj": ("qkv_proj", 1), "v_proj": ("qkv_proj", 2),
          "gate_proj": ("gate_up_proj", 0), "up_proj": ("gate_up_proj", 1)}


def to_engine_state_dict(hf: dict[str, torch.Tensor], spec: ModelSpec) -> dict[str, torch.Tensor]:
    """Rename HF keys to this model's and fuse q/k/v and gate/up."""
    out: dict[str, torch.Tensor] = {}
    parts: dict[str, dict[int, torch.Tensor]] = {}
    for key, t in hf.items():
        if "rotary_emb" in key:
            continue
        key = re.sub(r"^model\.", "", key)
        m = re.match(r"(layers\.\d+\.(?:self_attn|mlp)\.)(\w+)\.(weight|bias)$", key)
        if m and m.group(2) in _FUSED:
            fused, idx = _FUSED[m.group(2)]
            parts.setdefault(f"{m.group(1)}{fused}.{m.group(3)}", {})[idx] = t
            continue
        out[key] = t
    for key, pieces in parts.items():
        out[key] = torch.cat([pieces[i] for i in sorted(pieces)], dim=0)
    if spec.tie_word_embeddings:
        out.pop("lm_head.weight", None)
    return out


def build_model(spec: ModelSpec, hf_state: dict[str, torch.Tensor], dtype: torch.dtype,
                attention_backend: str = "auto", device: str = "cpu") -> LlamaForCausalLM:
    rope = RotaryEmbedding(spec.head_dim, spec.max_position_embeddings, spec.rope_theta, spec.rope_scaling)
    with torch.device("meta"):
        model = LlamaForCausalLM(spec, get_attention_backend(attention_backend, device, spec.head_dim, dtype), rope)
    state = to_engine_state_dict(hf_state, spec)
    expected = {k for k in model.state_dict() if not (spec.tie_word_embeddings and k == "lm_head.weight")}
    missing, extra = expected - set(state), set(state) - expected
    if missing or extra:
        raise ValueError(f"checkpoint does not fit the model: missing {sorted(missing)[:5]}, "
                         f"unexpected {sorted(extra)[:5]}")
    model.load_state_dict({k: v.to(dtype) for k, v in state.items()}, strict=False, assign=True)
    if spec.tie_word_embeddings:
        model.lm_head.weight = model.embed_tokens.weight
    return model.to(device).eval()


def save_checkpoint(hf_config: Any, hf_state: dict[str, torch.Tensor], path: str) -> None:
    """Write config.json + model.safetensors in the HF layout."""
    from safetensors.torch import save_file

    os.makedirs(path, exist_ok=True)
    hf_config.save_pretrained(path)
    save_file({k: v.contiguous() for k, v in hf_state.items()}, os.path.join(path, "model.safetensors"))
