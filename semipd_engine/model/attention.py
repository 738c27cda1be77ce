"""Paged attention over the block pool.

A batch is packed: the new tokens of every scheduled sequence are concatenated
(no padding). `AttentionMetadata` says where each token's K/V goes in the pool
(`slot_blocks`, `slot_offsets`) and how each sequence reads its context back (block tables).
Sequences with one new token (decodes) are attended as one padded batch; longer
ones (prefills, chunks, recomputes) one by one. Backends register by name;
`torch` is the reference and runs anywhere; `triton` (model/triton_attention.py, imported
only when asked for) runs paged kernels on CUDA. A backend declares the pool layout it
reads (`kv_layout`); the runner checks it against the `KVCache`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Optional

import torch
import torch.nn.functional as F

from semipd_engine.model.attention_metadata import AttentionMetadata
from semipd_engine.registry import Registry


def gather_blocks(cache: torch.Tensor, block_ids: torch.Tensor) -> torch.Tensor:
    # index_select copies whole rows; on CPU it is 5-10x faster than advanced indexing here.
    return cache.index_select(0, block_ids)


class TorchAttention:
    """Reference implementation with `scaled_dot_product_attention`."""

    kv_layout = "head_major"  # the pool layout it reads: [num_blocks, kv_heads, block_size, head_dim] per layer

    def forward(
        self,
        q: torch.Tensor,  # [T, H, D]
        k: torch.Tensor,  # [T, KVH, D]
        v: torch.Tensor,
        k_cache: torch.Tensor,  # [num_blocks, KVH, block_size, D]
        v_cache: torch.Tensor,
        meta: AttentionMetadata,
        scale: float,
    ) -> torch.Tensor:
        k_cache[meta.slot_blocks, :, meta.slot_offsets] = k
        v_cache[meta.slot_blocks, :, meta.slot_offsets] = v
        out = torch.empty_like(q)
        for p in meta.prefills:
            qs = q[p.start : p.end]
            if p.fresh:
                ks, vs = k[p.start : p.end], v[p.start : p.end]
                mask, causal = None, True
            else:
                ks = gather_blocks(k_cache, p.block_ids).transpose(0, 1).flatten(1, 2)[:, : p.ctx_len]
                vs = gather_blocks(v_cache, p.block_ids).transpose(0, 1).flatten(1, 2)[:, : p.ctx_len]
                q_len = p.end - p.start
                q_pos = torch.arange(p.ctx_len - q_len, p.ctx_len, device=q.device).unsqueeze(1)
                mask, causal = torch.arange(p.ctx_len, device=q.device).unsqueeze(0) <= q_pos, False
            # 4-D [1, heads, tokens, dim]: with 3-D inputs the CPU kernel falls back to the
            # math path, which materialises the whole score matrix (~5x slower at 2k tokens).
            if p.fresh:
                ks, vs = ks.transpose(0, 1), vs.transpose(0, 1)  # [KVH, T, D] like the gathered ones
            o = F.scaled_dot_product_attention(
                qs.transpose(0, 1)[None], ks[None], vs[None],
                attn_mask=mask, is_causal=causal, scale=scale, enable_gqa=True,
            )
            out[p.start : p.end] = o[0].transpose(0, 1)
        if meta.decode_idx is not None:
            out[meta.decode_idx] = self._decode(q[meta.decode_idx], k_cache, v_cache, meta, scale)
        return out


    @staticmethod
    def _decode(q, k_cache, v_cache, meta: AttentionMetadata, scale: float) -> torch.Tensor:
        """One query per sequence over its paged context: [B, H, D] -> [B, H, D].

        Attention runs per block on the gathered [B, blocks, KVH, block_size, D] K/V (head-major
        blocks make that a plain batched matmul, no re-layout copy), then one softmax over every
        block's scores, then the per-block outputs are summed.
        """
        _, kvh, bs, d = k_cache.shape
        bt = meta.decode_block_tables
        b, nb = bt.shape
        ks = gather_blocks(k_cache, bt.flatten()).view(b, nb, kvh, bs, d)
        vs = gather_blocks(v_cache, bt.flatten()).view(b, nb, kvh, bs, d)
        g = q.shape[1] // kvh
        qg = q.view(b, 1, kvh, g, d)
        scores = torch.matmul(qg, ks.transpose(-1, -2)).float() * scale  # [B, nb, KVH, G, bs]
        pos = torch.arange(nb * bs, device=q.device).view(1, nb, 1, 1, bs)
        scores.masked_fill_(pos >= meta.decode_ctx_lens.view(b, 1, 1, 1, 1), float("-inf"))
        scores = scores.permute(0, 2, 3, 1, 4)  # [B, KVH, G, nb, bs]
        probs = torch.softmax(scores.reshape(b, kvh, g, nb * bs), dim=-1).view(b, kvh, g, nb, bs)
        probs = probs.permute(0, 3, 1, 2, 4).to(q.dtype)  # [B, nb, KVH, G, bs]
        return torch.matmul(probs, vs).sum(dim=1).view(b, kvh * g, d)


def _triton_attention():
    # Imported on demand: this module, and the `torch` backend, never need triton.
    try:
        from semipd_engine.model.triton_attention import TritonAttention
    except ImportError as e:
        raise ValueError(f"attention backend 'triton' needs the triton package (pip install triton): {e}") from e
    return TritonAttention()


ATTENTION_BACKENDS: Registry[Callable[[], object]] = Registry("attention backend", "model.attention_backend")
ATTENTION_BACKENDS.register("torch", TorchAttention)
ATTENTION_BACKENDS.register("triton", _triton_attention)


def _auto_backend(device: str, head_dim: Optional[int], dtype: Optional[torch.dtype]) -> str:
    """`triton` on CUDA when triton imports and supports the shapes, `torch` everywhere else."""
    if torch.device(device).type != "cuda":
        return "torch"
    try:
        from semipd_engine.model.triton_attention import unsupported
    except ImportError:
        return "torch"
    return "torch" if unsupported(device, head_dim, dtype) else "triton"


def get_attention_backend(name: str, device: str, head_dim: Optional[int] = None,
                          dtype: Optional[torch.dtype] = None):
    """Build backend `name` (or pick one for `auto`); raises ValueError if it cannot run this model here."""
    if name == "auto":
        name = _auto_backend(device, head_dim, dtype)
    backend = ATTENTION_BACKENDS.get(name)()
    check = getattr(backend, "check", None)  # backends with limits refuse here, not at the first forward
    if check is not None:
        check(device, head_dim, dtype)
    return backend
