"""Triton attention over the paged KV pool: KV store, paged decode (split-K), packed prefill/extend.

Same contract as `TorchAttention.forward` (see `attention.py`): a packed batch of new tokens, their K/V slots
and, per sequence, a block table into the head-major pool `[num_blocks, kv_heads, block_size, head_dim]`.

Three kernels plus a merge:

- `_store_kv_kernel`: one program per new token writes its K and V (all KV heads) at `(block, offset)`.
- `_prefill_kernel`: one program per (sequence, query head, tile of `BLOCK_M` new tokens). A tile first attends to
  the sequence's cached prefix, read from the pool through its block table, then to the new tokens themselves
  (read from the packed K/V, causally). Online softmax in fp32, exp2 with the scale folded into log2(e).
- `_decode_split_kernel` + `_decode_merge_kernel`: one query token per sequence. The first kernel runs one
  program per (sequence, KV head, split of the context); all query heads sharing that KV head (GQA) are one
  `tl.dot` operand, padded to at least 16 rows. Each split writes its normalised partial output and its
  log-sum-exp; the second kernel merges the splits (split-K / flash-decoding) and writes the output row.

Keys are addressed token by token (`block_table[n // block_size]`, `n % block_size`), so a key tile may span
several pages and `block_size` need not be a power of two. Accumulation is fp32; fp32 inputs use IEEE
`tl.dot` (no TF32), so fp32 results match the torch reference closely.

On CPU the kernels run only under the Triton interpreter: `TRITON_INTERPRET=1` must be in the environment
before this module is imported (triton decides at kernel definition). The interpreter computes bf16 `tl.dot`
wrongly, so bf16 is refused there. Unsupported head dims, dtypes and devices raise `ValueError`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch
import triton
import triton.language as tl

from semipd_engine.model.attention_metadata import AttentionMetadata

KV_LAYOUT = "head_major"  # [num_blocks, kv_heads, block_size, head_dim] per layer, as `KVCache` allocates
SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
MIN_HEAD_DIM, MAX_HEAD_DIM = 16, 256  # tl.dot needs >= 16 along K; > 256 would not fit in registers
_LOG2E = 1.4426950408889634


# ---------------------------------------------------------------------------------------------------------------
# kernels


@triton.jit
def _store_kv_kernel(k_ptr, v_ptr, k_cache_ptr, v_cache_ptr, slot_block_ptr, slot_offset_ptr,
                     stride_kt, stride_kh, stride_vt, stride_vh, stride_cb, stride_ch, stride_cs,
                     num_kv_heads, HEAD_DIM: tl.constexpr, BLOCK_H: tl.constexpr):
    t = tl.program_id(0).to(tl.int64)
    blk = tl.load(slot_block_ptr + t).to(tl.int64)
    off = tl.load(slot_offset_ptr + t).to(tl.int64)
    h = tl.arange(0, BLOCK_H)
    d = tl.arange(0, HEAD_DIM)
    mask = (h < num_kv_heads)[:, None]
    dst = blk * stride_cb + h[:, None] * stride_ch + off * stride_cs + d[None, :]
    k = tl.load(k_ptr + t * stride_kt + h[:, None] * stride_kh + d[None, :], mask=mask)
    v = tl.load(v_ptr + t * stride_vt + h[:, None] * stride_vh + d[None, :], mask=mask)
    tl.store(k_cache_ptr + dst, k, mask=mask)
    tl.store(v_cache_ptr + dst, v, mask=mask)


@triton.jit
def _online_softmax_step(s, v, m_i, l_i, acc, DOT_PRECISION: tl.constexpr):
    """Fold one tile of log2-scaled scores `s` [M, N] (masked entries -inf) and values `v` [N, D] in."""
    m_new = tl.maximum(m_i, tl.max(s, 1))
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # rows with nothing seen yet: no inf - inf
    p = tl.exp2(s - m_safe[:, None])
    alpha = tl.exp2(m_i - m_safe)
    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
    l_i = l_i * alpha + tl.sum(p, 1)
    return m_new, l_i, acc


@triton.jit
def _paged_tiles(q, table, lo, hi, kvh, d, k_cache_ptr, v_cache_ptr, stride_cb, stride_ch, stride_cs, scale_log2,
                 m_i, l_i, acc, PAGE: tl.constexpr, BLOCK_N: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """Attend `q` to cached positions [lo, hi) of one sequence, read through its block table, tile by tile."""
    for start in range(lo, hi, BLOCK_N):
        n = start + tl.arange(0, BLOCK_N)
        n_mask = n < hi
        blk = tl.load(table + n // PAGE, mask=n_mask, other=0).to(tl.int64)
        kv = blk[:, None] * stride_cb + kvh * stride_ch + (n % PAGE)[:, None] * stride_cs + d[None, :]
        k = tl.load(k_cache_ptr + kv, mask=n_mask[:, None], other=0.0)
        v = tl.load(v_cache_ptr + kv, mask=n_mask[:, None], other=0.0)
        s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * scale_log2
        s = tl.where(n_mask[None, :], s, float("-inf"))
        m_i, l_i, acc = _online_softmax_step(s, v, m_i, l_i, acc, DOT_PRECISION)
    return m_i, l_i, acc


@triton.jit
def _prefill_kernel(q_ptr, k_ptr, v_ptr, k_cache_ptr, v_cache_ptr, out_ptr,
                    q_start_ptr, q_len_ptr, prefix_len_ptr, block_table_ptr,
                    stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, stride_ot, stride_oh,
                    stride_bt, stride_cb, stride_ch, stride_cs, scale_log2,
                    GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, PAGE: tl.constexpr,
                    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, DOT_PRECISION: tl.constexpr):
    seq = tl.program_id(0)
    h = tl.program_id(1)
    m0 = tl.program_id(2) * BLOCK_M
    q_len = tl.load(q_len_ptr + seq)
    if m0 >= q_len:
        return
    q_start = tl.load(q_start_ptr + seq).to(tl.int64)
    prefix_len = tl.load(prefix_len_ptr + seq)
    kvh = h // GROUP
    i = m0 + tl.arange(0, BLOCK_M)
    i_mask = i < q_len
    d = tl.arange(0, HEAD_DIM)
    q = tl.load(q_ptr + (q_start + i)[:, None] * stride_qt + h * stride_qh + d[None, :],
                mask=i_mask[:, None], other=0.0)
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)
    table = block_table_ptr + seq.to(tl.int64) * stride_bt

    # The cached prefix, through the block table: every new token sees all of it.
    m_i, l_i, acc = _paged_tiles(q, table, 0, prefix_len, kvh, d, k_cache_ptr, v_cache_ptr, stride_cb, stride_ch,
                                 stride_cs, scale_log2, m_i, l_i, acc, PAGE, BLOCK_N, DOT_PRECISION)

    # The new tokens themselves, causally; tiles entirely after this query tile are skipped.
    end = tl.minimum(q_len, m0 + BLOCK_M)
    for start in range(0, end, BLOCK_N):
        n = start + tl.arange(0, BLOCK_N)
        n_mask = n < q_len
        k = tl.load(k_ptr + (q_start + n)[:, None] * stride_kt + kvh * stride_kh + d[None, :],
                    mask=n_mask[:, None], other=0.0)
        v = tl.load(v_ptr + (q_start + n)[:, None] * stride_vt + kvh * stride_vh + d[None, :],
                    mask=n_mask[:, None], other=0.0)
        s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * scale_log2
        s = tl.where(n_mask[None, :] & (n[None, :] <= i[:, None]), s, float("-inf"))
        m_i, l_i, acc = _online_softmax_step(s, v, m_i, l_i, acc, DOT_PRECISION)

    o = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
    tl.store(out_ptr + (q_start + i)[:, None] * stride_ot + h * stride_oh + d[None, :],
             o.to(out_ptr.dtype.element_ty), mask=i_mask[:, None])


@triton.jit
def _decode_split_kernel(q_ptr, k_cache_ptr, v_cache_ptr, block_table_ptr, ctx_len_ptr, row_ptr,
                         mid_o_ptr, mid_lse_ptr, stride_qt, stride_qh, stride_bt, stride_cb, stride_ch, stride_cs,
                         num_heads, num_splits, scale_log2,
                         GROUP: tl.constexpr, BLOCK_G: tl.constexpr, HEAD_DIM: tl.constexpr, PAGE: tl.constexpr,
                         BLOCK_N: tl.constexpr, DOT_PRECISION: tl.constexpr):
    b = tl.program_id(0)
    kvh = tl.program_id(1)
    split = tl.program_id(2)
    ctx = tl.load(ctx_len_ptr + b)
    row = tl.load(row_ptr + b).to(tl.int64)
    per_split = tl.cdiv(tl.cdiv(ctx, num_splits), BLOCK_N) * BLOCK_N  # whole key tiles per split
    lo = split * per_split
    hi = tl.minimum(lo + per_split, ctx)
    g = tl.arange(0, BLOCK_G)
    g_mask = g < GROUP
    heads = kvh * GROUP + g
    d = tl.arange(0, HEAD_DIM)
    q = tl.load(q_ptr + row * stride_qt + heads[:, None] * stride_qh + d[None, :], mask=g_mask[:, None], other=0.0)
    m_i = tl.full([BLOCK_G], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_G], tl.float32)
    acc = tl.zeros([BLOCK_G, HEAD_DIM], tl.float32)
    table = block_table_ptr + b.to(tl.int64) * stride_bt
    m_i, l_i, acc = _paged_tiles(q, table, lo, hi, kvh, d, k_cache_ptr, v_cache_ptr, stride_cb, stride_ch, stride_cs,
                                 scale_log2, m_i, l_i, acc, PAGE, BLOCK_N, DOT_PRECISION)

    # An empty split (its range starts past the context) leaves weight 0: lse = -inf, output 0.
    seen = l_i > 0
    l_safe = tl.where(seen, l_i, 1.0)
    lse = tl.where(seen, m_i + tl.log2(l_safe), float("-inf"))
    mid = (b.to(tl.int64) * num_heads + heads) * num_splits + split
    tl.store(mid_lse_ptr + mid, lse, mask=g_mask)
    tl.store(mid_o_ptr + mid[:, None] * HEAD_DIM + d[None, :], acc / l_safe[:, None], mask=g_mask[:, None])


@triton.jit
def _decode_merge_kernel(mid_o_ptr, mid_lse_ptr, out_ptr, row_ptr, stride_ot, stride_oh, num_heads, num_splits,
                         HEAD_DIM: tl.constexpr, SPLITS_PAD: tl.constexpr):
    b = tl.program_id(0)
    h = tl.program_id(1)
    s = tl.arange(0, SPLITS_PAD)
    s_mask = s < num_splits
    d = tl.arange(0, HEAD_DIM)
    base = (b.to(tl.int64) * num_heads + h) * num_splits
    lse = tl.load(mid_lse_ptr + base + s, mask=s_mask, other=float("-inf"))
    w = tl.exp2(lse - tl.max(lse, 0))  # split 0 always holds context, so the max is finite
    o = tl.load(mid_o_ptr + (base + s)[:, None] * HEAD_DIM + d[None, :], mask=s_mask[:, None], other=0.0)
    o = tl.sum(o * w[:, None], 0) / tl.sum(w, 0)
    row = tl.load(row_ptr + b).to(tl.int64)
    tl.store(out_ptr + row * stride_ot + h * stride_oh + d, o.to(out_ptr.dtype.element_ty))


# ---------------------------------------------------------------------------------------------------------------
# host side


def interpreted() -> bool:
    """Whether this module's kernels were defined under the Triton interpreter (`TRITON_INTERPRET=1`)."""
    return not isinstance(_store_kv_kernel, triton.runtime.JITFunction)


def unsupported(device=None, head_dim: Optional[int] = None, dtype: Optional[torch.dtype] = None) -> Optional[str]:
    """Why the kernels cannot run for this device / head dim / dtype, or None when they can."""
    if device is not None:
        dev = torch.device(device)
        if dev.type == "cpu" and not interpreted():
            return ("attention backend 'triton' on device 'cpu' needs the Triton interpreter: set "
                    "TRITON_INTERPRET=1 in the environment before triton and this module are imported "
                    "(or use model.attention_backend=torch)")
        if dev.type not in ("cpu", "cuda"):
            return f"attention backend 'triton' does not support device {str(device)!r} (cuda, or cpu under the interpreter)"
    if head_dim is not None:
        if head_dim & (head_dim - 1) or not MIN_HEAD_DIM <= head_dim <= MAX_HEAD_DIM:
            return (f"attention backend 'triton' does not support head_dim={head_dim}: it must be a power of two "
                    f"in [{MIN_HEAD_DIM}, {MAX_HEAD_DIM}]")
    if dtype is not None:
        if dtype not in SUPPORTED_DTYPES:
            return f"attention backend 'triton' does not support dtype {dtype} (float16, bfloat16, float32)"
        if dtype == torch.bfloat16 and interpreted():
            return ("attention backend 'triton' refuses dtype torch.bfloat16 under the Triton interpreter, whose "
                    "bf16 tl.dot gives wrong results; use float16/float32 there, or a GPU")
    return None


def _next_pow2(n: int) -> int:
    return 1 << max(0, n - 1).bit_length()


@dataclass
class _Prefills:
    """Per-batch prefill arguments, built once per `AttentionMetadata` and reused by every layer."""
    q_start: torch.Tensor  # [S] int32
    q_len: torch.Tensor
    prefix_len: torch.Tensor
    block_tables: torch.Tensor  # [S, max_blocks] int32, zero padded
    max_q_len: int


def default_tiles(dtype: torch.dtype, head_dim: int) -> tuple[int, int, Optional[int]]:
    """(block_m, block_n, num_stages) sized to stay under ~100 KB of shared memory (consumer GPUs' limit).

    Compiled offline with triton 3.9 for sm_80/86/90: 16-bit inputs at 64x64 tiles (64x32 for head_dim 256)
    take 16-53 KB; fp32 takes the FMA path (IEEE dots), whose layout conversions need far more, so it gets
    32x32 tiles (16x32 for head_dim 256) without software pipelining: 41-82 KB.
    """
    if dtype == torch.float32:
        return (16 if head_dim > 128 else 32), 32, 1
    return 64, (32 if head_dim > 128 else 64), None


class TritonAttention:
    """Triton kernels over the head-major paged pool; `forward` has `TorchAttention.forward`'s signature.

    `block_m` / `block_n` are the query / key tile sizes (powers of two >= 16; by default `default_tiles`).
    `num_splits` fixes the decode split count (tests); by default it is chosen per batch so that
    (sequences x KV heads x splits) fills the GPU about twice over, with at least `min_split_tokens` of context
    per split and at most `max_splits` splits.
    """

    kv_layout = KV_LAYOUT

    def __init__(self, block_m: Optional[int] = None, block_n: Optional[int] = None,
                 num_splits: Optional[int] = None, max_splits: int = 16, min_split_tokens: int = 256):
        for name, val in (("block_m", block_m), ("block_n", block_n)):
            if val is not None and (val < 16 or val & (val - 1)):
                raise ValueError(f"{name}={val}: must be a power of two >= 16")
        if num_splits is not None and num_splits < 1:
            raise ValueError(f"num_splits={num_splits}: must be >= 1")
        self.block_m, self.block_n = block_m, block_n
        self.num_splits, self.max_splits, self.min_split_tokens = num_splits, max_splits, min_split_tokens
        self._meta: Optional[AttentionMetadata] = None
        self._prefills: Optional[_Prefills] = None
        self._sm_count: dict[int, int] = {}

    def __getstate__(self):  # shared with worker processes: drop the per-batch cache
        state = dict(self.__dict__)
        state["_meta"], state["_prefills"] = None, None
        return state

    def check(self, device=None, head_dim: Optional[int] = None, dtype: Optional[torch.dtype] = None) -> None:
        reason = unsupported(device, head_dim, dtype)
        if reason:
            raise ValueError(reason)

    # -- per batch ------------------------------------------------------------------------------------------
    def _prepare_prefills(self, meta: AttentionMetadata, device: torch.device) -> _Prefills:
        if self._meta is meta and self._prefills is not None:
            return self._prefills
        ps = meta.prefills
        lens = torch.tensor([[p.start for p in ps], [p.end - p.start for p in ps],
                             [p.ctx_len - (p.end - p.start) for p in ps]], dtype=torch.int32)
        tables = torch.nn.utils.rnn.pad_sequence([p.block_ids.to(device=device, dtype=torch.int32) for p in ps],
                                                 batch_first=True)
        lens = lens.to(device)
        self._meta = meta
        self._prefills = _Prefills(lens[0], lens[1], lens[2], tables, max(p.end - p.start for p in ps))
        return self._prefills

    def _splits(self, batch: int, kv_heads: int, max_ctx: int, device: torch.device) -> int:
        if self.num_splits is not None:
            return self.num_splits
        if device.type != "cuda":
            sms = 1
        else:
            idx = device.index if device.index is not None else torch.cuda.current_device()
            if idx not in self._sm_count:
                self._sm_count[idx] = torch.cuda.get_device_properties(idx).multi_processor_count
            sms = self._sm_count[idx]
        want = math.ceil(2 * sms / (batch * kv_heads))
        return max(1, min(want, self.max_splits, math.ceil(max_ctx / self.min_split_tokens)))

    # -- forward --------------------------------------------------------------------------------------------
    def _validate(self, q, k, v, k_cache, v_cache) -> None:
        self.check(q.device, q.shape[-1], q.dtype)
        d, kvh = q.shape[-1], k.shape[1]
        if k_cache.dim() != 4 or tuple(k_cache.shape[1:2]) + tuple(k_cache.shape[3:]) != (kvh, d):
            raise ValueError(f"KV cache of shape {tuple(k_cache.shape)} is not the {KV_LAYOUT} layout "
                             f"[num_blocks, kv_heads={kvh}, block_size, head_dim={d}]")
        if v_cache.shape != k_cache.shape or v_cache.stride() != k_cache.stride() or k_cache.stride(-1) != 1:
            raise ValueError("K and V caches must have the same shape and strides, contiguous along head_dim")
        for name, t in (("q", q), ("k", k), ("v", v), ("k_cache", k_cache), ("v_cache", v_cache)):
            if t.dtype != q.dtype or t.device != q.device:
                raise ValueError(f"{name} is {t.dtype} on {t.device}; expected {q.dtype} on {q.device}")
        if q.shape[1] % kvh:
            raise ValueError(f"{q.shape[1]} query heads are not a multiple of {kvh} KV heads")

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor,
                v_cache: torch.Tensor, meta: AttentionMetadata, scale: float) -> torch.Tensor:
        self._validate(q, k, v, k_cache, v_cache)
        q, k, v = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, k, v))
        num_tokens, num_heads, d = q.shape
        kvh, page = k_cache.shape[1], k_cache.shape[2]
        group = num_heads // kvh
        precision = "ieee" if q.dtype == torch.float32 else "tf32"  # the latter is ignored for 16-bit inputs
        block_m, block_n, stages = default_tiles(q.dtype, d)
        block_m, block_n = self.block_m or block_m, self.block_n or block_n
        launch = {} if stages is None else {"num_stages": stages}
        scale_log2 = scale * _LOG2E
        cs = k_cache.stride()
        out = torch.empty_like(q)
        if num_tokens == 0:
            return out

        _store_kv_kernel[(num_tokens,)](
            k, v, k_cache, v_cache, meta.slot_blocks, meta.slot_offsets,
            k.stride(0), k.stride(1), v.stride(0), v.stride(1), cs[0], cs[1], cs[2],
            kvh, HEAD_DIM=d, BLOCK_H=max(2, _next_pow2(kvh)))

        if meta.prefills:
            pf = self._prepare_prefills(meta, q.device)
            grid = (len(meta.prefills), num_heads, triton.cdiv(pf.max_q_len, block_m))
            _prefill_kernel[grid](
                q, k, v, k_cache, v_cache, out, pf.q_start, pf.q_len, pf.prefix_len, pf.block_tables,
                q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
                out.stride(0), out.stride(1), pf.block_tables.stride(0), cs[0], cs[1], cs[2], scale_log2,
                GROUP=group, HEAD_DIM=d, PAGE=page, BLOCK_M=block_m, BLOCK_N=block_n, DOT_PRECISION=precision,
                **launch)

        if meta.decode_idx is not None and meta.decode_idx.numel():
            tables = meta.decode_block_tables
            batch = tables.shape[0]
            # The padded table width bounds the longest context without reading lengths back from the device.
            splits = self._splits(batch, kvh, tables.shape[1] * page, q.device)
            mid_o = torch.empty(batch, num_heads, splits, d, dtype=torch.float32, device=q.device)
            mid_lse = torch.empty(batch, num_heads, splits, dtype=torch.float32, device=q.device)
            _decode_split_kernel[(batch, kvh, splits)](
                q, k_cache, v_cache, tables, meta.decode_ctx_lens, meta.decode_idx, mid_o, mid_lse,
                q.stride(0), q.stride(1), tables.stride(0), cs[0], cs[1], cs[2], num_heads, splits, scale_log2,
                GROUP=group, BLOCK_G=max(16, _next_pow2(group)), HEAD_DIM=d, PAGE=page, BLOCK_N=block_n,
                DOT_PRECISION=precision, **launch)
            _decode_merge_kernel[(batch, num_heads)](
                mid_o, mid_lse, out, meta.decode_idx, out.stride(0), out.stride(1), num_heads, splits,
                HEAD_DIM=d, SPLITS_PAD=max(2, _next_pow2(splits)))
        return out
