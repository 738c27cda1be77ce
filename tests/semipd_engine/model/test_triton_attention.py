"""Triton attention kernels against the torch reference backend.

Without a GPU the kernels run under the Triton interpreter (conftest.py sets `TRITON_INTERPRET=1`) on CPU
tensors; with CUDA they compile and the same comparisons run on the GPU. Shapes are tiny (head_dim 16,
2 KV heads, pages of 4 tokens, 16-token tiles) so that every case still crosses page and tile boundaries.

Tolerances against `TorchAttention` in the same dtype: float32 atol = rtol = 1e-5 (the kernels use IEEE
fp32 dots; observed ~5e-7); float16 atol = rtol = 2e-3 (both sides round to fp16, whose spacing near 1 is
~1e-3; the kernel also rounds probabilities to fp16 before the P.V product). The KV store must be exact.
bfloat16 is not compared under the interpreter (its bf16 `tl.dot` is wrong, and the backend refuses it there).
"""

from __future__ import annotations

import math
import os
import pickle
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch

pytest.importorskip("triton")

from semipd_engine.core.request import SamplingParams  # noqa: E402
from semipd_engine.model.attention import TorchAttention, get_attention_backend  # noqa: E402
from semipd_engine.model.attention_metadata import AttentionMetadata, PrefillSeq  # noqa: E402
from semipd_engine.model.triton_attention import TritonAttention, interpreted  # noqa: E402
from semipd_engine.runtime.factory import build_core  # noqa: E402
from semipd_engine.runtime.kv_cache import KVCache  # noqa: E402
from semipd_engine.runtime.runner import ModelRunner  # noqa: E402
from tests.helpers import engine_cfg, model_cfg, prompts  # noqa: E402

DEVICE = "cpu" if interpreted() else "cuda"
if DEVICE == "cuda" and not torch.cuda.is_available():
    pytest.skip("triton kernels were compiled for a GPU (TRITON_INTERPRET unset) and there is no CUDA device",
                allow_module_level=True)

TOL = {torch.float32: dict(atol=1e-5, rtol=1e-5), torch.float16: dict(atol=2e-3, rtol=2e-3)}
PAGE, HEAD_DIM, KV_HEADS = 4, 16, 2


def make_case(seqs, group, dtype=torch.float32, kv_heads=KV_HEADS, head_dim=HEAD_DIM, page=PAGE, seed=0):
    """A packed batch as the runner builds it. `seqs`: (cached tokens, new tokens) per sequence; one new token
    makes a decode, more a prefill (a chunk when something is cached). Blocks are handed out in a shuffled order
    and the pool starts as noise, so a kernel reading a wrong slot or past a context shows up."""
    g = torch.Generator().manual_seed(seed)
    need = [math.ceil((c + n) / page) for c, n in seqs]
    free = torch.randperm(sum(need) + 2, generator=g).tolist()

    def randn(*shape):
        return torch.randn(*shape, generator=g).to(dtype).to(DEVICE)

    k_cache, v_cache = randn(len(free), kv_heads, page, head_dim), randn(len(free), kv_heads, page, head_dim)
    tokens = sum(n for _, n in seqs)
    q, k, v = randn(tokens, kv_heads * group, head_dim), randn(tokens, kv_heads, head_dim), randn(tokens, kv_heads, head_dim)
    slot_blocks, slot_offsets, prefills, rows, tables, lens = [], [], [], [], [], []
    row = 0
    for (cached, new), m in zip(seqs, need):
        table, free = free[:m], free[m:]
        for p in range(cached, cached + new):
            slot_blocks.append(table[p // page])
            slot_offsets.append(p % page)
        if new == 1:
            rows.append(row)
            tables.append(table)
            lens.append(cached + 1)
        else:
            prefills.append(PrefillSeq(row, row + new, cached + new, torch.tensor(table, device=DEVICE)))
        row += new
    meta = AttentionMetadata(torch.tensor(slot_blocks, device=DEVICE), torch.tensor(slot_offsets, device=DEVICE),
                             prefills)
    if rows:
        width = max(map(len, tables))
        meta.decode_idx = torch.tensor(rows, device=DEVICE)
        meta.decode_block_tables = torch.tensor([t + [0] * (width - len(t)) for t in tables], device=DEVICE)
        meta.decode_ctx_lens = torch.tensor(lens, device=DEVICE)
    return q, k, v, k_cache, v_cache, meta


def check_against_reference(case, backend: TritonAttention, scale: float = 0.25):
    q, k, v, k_cache, v_cache, meta = case
    k_ref, v_ref = k_cache.clone(), v_cache.clone()
    ref = TorchAttention().forward(q, k, v, k_ref, v_ref, meta, scale)
    out = backend.forward(q, k, v, k_cache, v_cache, meta, scale)
    assert torch.equal(k_cache, k_ref) and torch.equal(v_cache, v_ref), "KV store differs"
    torch.testing.assert_close(out, ref, **TOL[q.dtype])
    return out


def tiny_backend(**kw) -> TritonAttention:
    return TritonAttention(block_m=16, block_n=16, **kw)


# Contexts shorter than a page, exactly one page, one past a page, one tile, past a tile, several tiles.
DECODES = [(0, 1), (2, 1), (3, 1), (4, 1), (15, 1), (16, 1), (36, 1)]
# Fresh prompts (one under a page, one over a tile), chunks on a cached prefix that ends mid-page and on a
# page boundary, and a chunk longer than a query tile.
PREFILLS = [(0, 3), (0, 21), (5, 6), (8, 4), (13, 19)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("group", [1, 2, 4, 8])
def test_mixed_batch_matches_reference(group, dtype):
    # Interleaved prefills and decodes; three decode splits, so short contexts also have empty splits.
    seqs = [s for pair in zip(PREFILLS + [(0, 2)] * 2, DECODES) for s in pair]
    check_against_reference(make_case(seqs, group, dtype, seed=group), tiny_backend(num_splits=3))


@pytest.mark.parametrize("splits", [1, 2, 5, 16])
def test_decode_only_split_counts(splits):
    # Empty prefill part. Splits are whole 16-token tiles: 5 splits of 37 tokens leave the last two empty, 16 most.
    check_against_reference(make_case(DECODES, 2, seed=splits), tiny_backend(num_splits=splits))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
def test_prefill_only(dtype):
    # Empty decode part.
    check_against_reference(make_case(PREFILLS, 4, dtype), tiny_backend())


@pytest.mark.parametrize("head_dim, dtype", [(32, torch.float32), (64, torch.float16)], ids=["d32-fp32", "d64-fp16"])
def test_other_head_dims_and_default_tiles(head_dim, dtype):
    # The default tiles (fp32: 32x32 unpipelined, 16-bit: 64x64) and split heuristic; wider heads.
    case = make_case([(0, 9), (30, 1), (70, 1), (40, 10)], 2, dtype, head_dim=head_dim, page=16)
    check_against_reference(case, TritonAttention())


def test_page_size_not_a_power_of_two():
    check_against_reference(make_case([(0, 7), (11, 1), (6, 9), (4, 1)], 2, page=5), tiny_backend(num_splits=2))


def test_store_writes_only_the_new_slots():
    q, k, v, k_cache, v_cache, meta = make_case([(0, 5), (6, 1), (3, 3)], 1)
    before = k_cache.clone()
    TritonAttention().forward(q, k, v, k_cache, v_cache, meta, 0.25)
    written = torch.zeros(k_cache.shape[0], k_cache.shape[2], dtype=torch.bool, device=DEVICE)
    written[meta.slot_blocks, meta.slot_offsets] = True
    assert torch.equal(k_cache.transpose(1, 2)[~written], before.transpose(1, 2)[~written])
    assert torch.equal(k_cache[meta.slot_blocks, :, meta.slot_offsets], k)
    assert torch.equal(v_cache[meta.slot_blocks, :, meta.slot_offsets], v)


def test_batch_cache_is_rebuilt_for_each_batch():
    # Every layer of one forward reuses the per-batch prefill arguments; the next batch must not.
    backend = tiny_backend()
    check_against_reference(make_case([(0, 7), (2, 1)], 2, seed=1), backend)
    check_against_reference(make_case([(4, 9), (0, 3)], 2, seed=2), backend)
    assert backend._meta is not None and pickle.loads(pickle.dumps(backend))._meta is None  # workers get it clean


# -- refusals -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("head_dim", [8, 24, 96, 512])
def test_unsupported_head_dim_is_refused(head_dim):
    with pytest.raises(ValueError, match=f"head_dim={head_dim}"):
        TritonAttention().check(DEVICE, head_dim, torch.float32)
    q, k, v, k_cache, v_cache, meta = make_case([(0, 3)], 1, head_dim=head_dim)
    with pytest.raises(ValueError, match=f"head_dim={head_dim}"):
        TritonAttention().forward(q, k, v, k_cache, v_cache, meta, 0.25)


@pytest.mark.parametrize("dtype", [torch.float64, torch.int32])
def test_unsupported_dtype_is_refused(dtype):
    with pytest.raises(ValueError, match=str(dtype)):
        TritonAttention().check(DEVICE, HEAD_DIM, dtype)


def test_unsupported_device_and_layout_are_refused():
    with pytest.raises(ValueError, match="'meta'"):
        TritonAttention().check("meta")
    q, k, v, k_cache, v_cache, meta = make_case([(0, 3)], 1)
    token_major = k_cache.transpose(1, 2).contiguous()  # [blocks, block_size, kv_heads, dim]
    with pytest.raises(ValueError, match="head_major"):
        TritonAttention().forward(q, k, v, token_major, token_major.clone(), meta, 0.25)


@pytest.mark.skipif(not interpreted(), reason="the interpreter's bf16 limit")
def test_bfloat16_is_refused_under_the_interpreter():
    with pytest.raises(ValueError, match="bfloat16"):
        TritonAttention().check("cpu", HEAD_DIM, torch.bfloat16)


def test_cpu_without_the_interpreter_is_refused():
    # A fresh interpreter without TRITON_INTERPRET: kernels are compiled for a GPU, so CPU tensors are refused.
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    code = ("from semipd_engine.model.attention import get_attention_backend\n"
            "try:\n    get_attention_backend('triton', 'cpu', 16, None)\n"
            "except ValueError as e:\n    print('REFUSED', e)\n")
    res = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    assert "REFUSED" in res.stdout and "TRITON_INTERPRET=1" in res.stdout, res.stdout


def test_auto_picks_triton_only_on_cuda_with_supported_shapes():
    assert isinstance(get_attention_backend("auto", "cpu", HEAD_DIM, torch.float32), TorchAttention)
    assert isinstance(get_attention_backend("auto", "cuda", 128, torch.float16), TritonAttention)
    assert isinstance(get_attention_backend("auto", "cuda", 80, torch.float16), TorchAttention)
    with pytest.raises(ValueError, match="head_dim=80"):
        get_attention_backend("triton", "cuda", 80, torch.float16)


def test_runner_checks_the_kv_layout():
    spec = SimpleNamespace(num_layers=1, num_kv_heads=KV_HEADS, head_dim=HEAD_DIM)
    kv = KVCache(spec, 4, PAGE, torch.float32, share=False)

    class Model:
        attention_backend = TritonAttention()

    ModelRunner(Model(), kv)
    Model.attention_backend.kv_layout = "token_major"
    with pytest.raises(ValueError, match="token_major"):
        ModelRunner(Model(), kv)


# -- engine -------------------------------------------------------------------------------------------------


def test_engine_greedy_matches_torch_backend(llama_checkpoint):
    # Chunked prefill with a small token budget: chunks on cached prefixes batched with decodes.
    cfg = dict(policy="chunked", num_kv_blocks=64, block_size=4, max_num_batched_tokens=16)
    params = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)
    outs = {}
    for backend in ("torch", "triton"):
        core = build_core(model_cfg(llama_checkpoint, attention_backend=backend, device=DEVICE), engine_cfg(**cfg))
        ps = prompts(core.executor.model.spec.vocab_size)
        outs[backend] = core.generate(ps, params)
        assert core.pool.num_used == 0
    assert isinstance(core.executor.model.attention_backend, TritonAttention)
    assert outs["triton"] == outs["torch"]


# -- compiled for a GPU without one ----------------------------------------------------------------------

COMPILE_CHECK = """
import sys, warnings
warnings.filterwarnings("ignore")
import torch, triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from semipd_engine.model import triton_attention as ta

arch = int(sys.argv[1])
worst = 0
for dtype, tname in ((torch.float16, "fp16"), (torch.float32, "fp32")):
    for d in (128, 256):
        bm, bn, stages = ta.default_tiles(dtype, d)
        prec = "ieee" if dtype == torch.float32 else "tf32"
        p = "*" + tname
        kernels = [
            (ta._store_kv_kernel, dict(k_ptr=p, v_ptr=p, k_cache_ptr=p, v_cache_ptr=p, slot_block_ptr="*i64",
                                       slot_offset_ptr="*i64"), dict(HEAD_DIM=d, BLOCK_H=8)),
            (ta._prefill_kernel, dict(q_ptr=p, k_ptr=p, v_ptr=p, k_cache_ptr=p, v_cache_ptr=p, out_ptr=p,
                                      q_start_ptr="*i32", q_len_ptr="*i32", prefix_len_ptr="*i32",
                                      block_table_ptr="*i32", scale_log2="fp32"),
             dict(GROUP=4, HEAD_DIM=d, PAGE=16, BLOCK_M=bm, BLOCK_N=bn, DOT_PRECISION=prec)),
            (ta._decode_split_kernel, dict(q_ptr=p, k_cache_ptr=p, v_cache_ptr=p, block_table_ptr="*i64",
                                           ctx_len_ptr="*i64", row_ptr="*i64", mid_o_ptr="*fp32",
                                           mid_lse_ptr="*fp32", scale_log2="fp32"),
             dict(GROUP=4, BLOCK_G=16, HEAD_DIM=d, PAGE=16, BLOCK_N=bn, DOT_PRECISION=prec)),
            (ta._decode_merge_kernel, dict(mid_o_ptr="*fp32", mid_lse_ptr="*fp32", out_ptr=p, row_ptr="*i64"),
             dict(HEAD_DIM=d, SPLITS_PAD=4)),
        ]
        for fn, types, consts in kernels:
            sig = {n: "constexpr" if n in consts else types.get(n, "i32") for n in fn.arg_names}
            opts = {} if stages is None else {"num_stages": stages}
            k = triton.compile(ASTSource(fn, sig, consts), target=GPUTarget("cuda", arch, 32), options=opts)
            worst = max(worst, k.metadata.shared)
print("MAX_SHARED", worst)
"""


@pytest.mark.parametrize("arch", [pytest.param(80, marks=pytest.mark.slow), 90])
def test_kernels_compile_for_a_gpu(arch):
    # The one check of GPU lowering without a GPU: every kernel, fp16 and fp32, head_dim 128 and 256, default
    # tiles, compiled to a cubin by triton's bundled compiler; shared memory must stay within consumer GPUs'
    # ~100 KB. Uses triton's internal compile API (checked with triton 3.9); ~15 s per architecture on 2 cores
    # with a cold kernel cache, so sm_80 is `slow`.
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    res = subprocess.run([sys.executable, "-c", COMPILE_CHECK, str(arch)], env=env, capture_output=True, text=True,
                         timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    assert int(res.stdout.split("MAX_SHARED")[1]) <= 99 * 1024, res.stdout


# -- GPU only: realistic shapes, every dtype ----------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.skipif(DEVICE != "cuda", reason="needs a CUDA device")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32], ids=["fp16", "bf16", "fp32"])
@pytest.mark.parametrize("group", [1, 4, 8])
def test_gpu_realistic_shapes(dtype, group):
    seqs = [(0, 300), (1000, 200), (0, 1), (4000, 1), (1500, 1), (63, 1), (17, 129)] + [(700, 1)] * 20
    case = make_case(seqs, group, dtype, kv_heads=4, head_dim=128, page=16, seed=group)
    q, k, v, k_cache, v_cache, meta = case
    k_ref, v_ref = k_cache.clone(), v_cache.clone()
    ref = TorchAttention().forward(q.float(), k.float(), v.float(), k_ref.float(), v_ref.float(), meta, 128**-0.5)
    out = TritonAttention().forward(q, k, v, k_cache, v_cache, meta, 128**-0.5)
    tol = {torch.float32: 1e-4, torch.float16: 5e-3, torch.bfloat16: 3e-2}[dtype]  # vs an fp32 reference
    torch.testing.assert_close(out.float(), ref, atol=tol, rtol=tol)


@pytest.mark.gpu
@pytest.mark.skipif(DEVICE != "cuda", reason="needs a CUDA device")
@pytest.mark.parametrize("policy", ["prefill_priority", "chunked"])
def test_gpu_engine_greedy_matches_torch_backend(llama_checkpoint, policy):
    cfg = dict(policy=policy, num_kv_blocks=64, block_size=4, max_num_batched_tokens=32)
    params = SamplingParams(max_tokens=16, temperature=0.0, ignore_eos=True)
    outs = {}
    for backend in ("torch", "triton"):
        core = build_core(model_cfg(llama_checkpoint, attention_backend=backend, device="cuda"), engine_cfg(**cfg))
        outs[backend] = core.generate(prompts(core.executor.model.spec.vocab_size), params)
    assert outs["triton"] == outs["torch"]
