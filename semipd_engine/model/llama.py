"""Llama-family decoder (Llama 2/3, Qwen2) whose forward runs over the paged KV pool.

Parameter names follow the HF checkpoints except that q/k/v and gate/up are
fused at load time (one matmul instead of three/two); see `loader.py`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from semipd_engine.model.attention_metadata import AttentionMetadata
from semipd_engine.model.rope import RotaryEmbedding
from semipd_engine.model.spec import ModelSpec


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * xf.to(x.dtype)


class Attention(nn.Module):
    def __init__(self, spec: ModelSpec, rope: RotaryEmbedding, backend):
        super().__init__()
        self.h, self.kvh, self.d = spec.num_heads, spec.num_kv_heads, spec.head_dim
        self.qkv_proj = nn.Linear(spec.hidden_size, (self.h + 2 * self.kvh) * self.d, bias=spec.qkv_bias)
        self.o_proj = nn.Linear(self.h * self.d, spec.hidden_size, bias=False)
        self.rope, self.backend, self.scale = rope, backend, self.d**-0.5

    def forward(self, x, positions, meta: AttentionMetadata, k_cache, v_cache):
        qkv = self.qkv_proj(x)
        q, k, v = qkv.split([self.h * self.d, self.kvh * self.d, self.kvh * self.d], dim=-1)
        q = q.view(-1, self.h, self.d)
        k = k.view(-1, self.kvh, self.d)
        v = v.view(-1, self.kvh, self.d)
        q, k = self.rope(positions, q, k)
        o = self.backend.forward(q, k, v, k_cache, v_cache, meta, self.scale)
        return self.o_proj(o.flatten(1))


class MLP(nn.Module):
    def __init__(self, spec: ModelSpec):
        super().__init__()
        self.gate_up_proj = nn.Linear(spec.hidden_size, 2 * spec.intermediate_size, bias=False)
        self.down_proj = nn.Linear(spec.intermediate_size, spec.hidden_size, bias=False)

    def forward(self, x):
        gate, up = self.gate_up_proj(x).chunk(2, dim=-1)
        return self.down_proj(F.silu(gate) * up)


class DecoderLayer(nn.Module):
    def __init__(self, spec: ModelSpec, rope, backend):
        super().__init__()
        self.input_layernorm = RMSNorm(spec.hidden_size, spec.rms_norm_eps)
        self.self_attn = Attention(spec, rope, backend)
        self.post_attention_layernorm = RMSNorm(spec.hidden_size, spec.rms_norm_eps)
        self.mlp = MLP(spec)

    def forward(self, x, positions, meta, k_cache, v_cache):
        x = x + self.self_attn(self.input_layernorm(x), positions, meta, k_cache, v_cache)
        return x + self.mlp(self.post_attention_layernorm(x))


class LlamaForCausalLM(nn.Module):
    def __init__(self, spec: ModelSpec, attention_backend, rope: RotaryEmbedding | None = None):
        super().__init__()
        self.spec = spec
        self.attention_backend = attention_backend  # shared by every layer; the runner checks its KV layout
        # Passing `rope` in lets the loader build parameters on the meta device
        # while the (computed, not loaded) rotary tables stay real.
        rope = rope or RotaryEmbedding(
            spec.head_dim, spec.max_position_embeddings, spec.rope_theta, spec.rope_scaling
        )
        self.rotary = rope
        self.embed_tokens = nn.Embedding(spec.vocab_size, spec.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(spec, rope, attention_backend) for _ in range(spec.num_layers))
        self.norm = RMSNorm(spec.hidden_size, spec.rms_norm_eps)
        self.lm_head = nn.Linear(spec.hidden_size, spec.vocab_size, bias=False)
        if spec.tie_word_embeddings:
            self.lm_head.weight = self.embed_tokens.weight

    def forward(self, input_ids, positions, meta: AttentionMetadata, kv_caches) -> torch.Tensor:
        """Hidden states [T, hidden] of the packed batch; writes new K/V into `kv_caches`."""
        x = self.embed_tokens(input_ids)
        for layer, (k_cache, v_cache) in zip(self.layers, kv_caches):
            x = layer(x, positions, meta, k_cache, v_cache)
        return self.norm(x)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head(hidden).float()
