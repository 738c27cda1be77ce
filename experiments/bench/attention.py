"""Attention backends on a CUDA GPU: Triton kernels vs the torch reference.

    python -m experiments.bench.attention [--dtype float16] [--out FILE.json]

- decode: one query per sequence over paged contexts (batch x context grid, Llama-3-8B-like heads: 32 query /
  8 KV heads, head_dim 128, 16-token pages). Time of one backend `forward` (KV store + attention) against the
  bytes it must read (every context token's K and V, plus q and the output), i.e. achieved bandwidth, next to
  the device's copy bandwidth measured in the same run.
- prefill: a fresh prompt and a chunk on a cached prefix, as TFLOP/s of the causal QK^T and PV products.
- end to end: one engine decode step (`llama-100m`, batch 32, 256-token contexts) with each backend.

Needs CUDA and triton; on any other machine it says so and exits with status 2.
"""

from __future__ import annotations

import argparse
import math
import sys

import torch

H, KVH, D, PAGE = 32, 8, 128, 16
DECODE_GRID = [(1, 4096), (8, 4096), (32, 1024), (32, 4096), (128, 1024), (128, 4096), (256, 2048)]
PREFILLS = [(0, 2048), (4096, 512)]  # (cached prefix, new tokens)


def ms(fn) -> float:
    """Median milliseconds of `fn` on the GPU (L2 flushed between runs)."""
    import triton.testing

    return triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median")


def forward_ms(backend, case) -> float:
    """One backend `forward` (KV store + attention) over the packed batch `case`."""
    q, k, v, k_cache, v_cache, meta = case
    return ms(lambda: backend.forward(q, k, v, k_cache, v_cache, meta, D**-0.5))


def copy_bandwidth(dtype: torch.dtype, mb: int = 1024) -> float:
    src = torch.empty(mb * 2**20 // 2, dtype=dtype, device="cuda").fill_(1)
    dst = torch.empty_like(src)
    return 2 * src.numel() * src.element_size() / (ms(lambda: dst.copy_(src)) / 1e3)


def batch(seqs: list[tuple[int, int]], dtype: torch.dtype, seed: int = 0):
    """A packed batch over a pool just large enough, blocks handed out in shuffled order (as after churn)."""
    from semipd_engine.model.attention_metadata import AttentionMetadata, PrefillSeq

    g = torch.Generator(device="cuda").manual_seed(seed)
    need = [math.ceil((c + n) / PAGE) for c, n in seqs]
    free = torch.randperm(sum(need), generator=g, device="cuda").tolist()
    k_cache = torch.randn(len(free), KVH, PAGE, D, generator=g, device="cuda").to(dtype)
    v_cache = torch.randn_like(k_cache)
    tokens = sum(n for _, n in seqs)
    q = torch.randn(tokens, H, D, device="cuda").to(dtype)
    k, v = torch.randn(tokens, KVH, D, device="cuda").to(dtype), torch.randn(tokens, KVH, D, device="cuda").to(dtype)
    slot_blocks, slot_offsets, prefills, rows, tables, lens, row = [], [], [], [], [], [], 0
    for (cached, new), m in zip(seqs, need):
        table, free = free[:m], free[m:]
        slot_blocks += [table[p // PAGE] for p in range(cached, cached + new)]
        slot_offsets += [p % PAGE for p in range(cached, cached + new)]
        if new == 1:
            rows.append(row)
            tables.append(table)
            lens.append(cached + 1)
        else:
            prefills.append(PrefillSeq(row, row + new, cached + new, torch.tensor(table, device="cuda")))
        row += new
    meta = AttentionMetadata(torch.tensor(slot_blocks, device="cuda"), torch.tensor(slot_offsets, device="cuda"),
                             prefills)
    if rows:
        width = max(map(len, tables))
        meta.decode_idx = torch.tensor(rows, device="cuda")
        meta.decode_block_tables = torch.tensor([t + [0] * (width - len(t)) for t in tables], device="cuda")
        meta.decode_ctx_lens = torch.tensor(lens, device="cuda")
    return q, k, v, k_cache, v_cache, meta


def bench_decode(backends: dict, dtype: torch.dtype, bandwidth: float) -> list[dict]:
    out = []
    elem = torch.tensor([], dtype=dtype).element_size()
    for b, ctx in DECODE_GRID:
        case = batch([(ctx - 1, 1)] * b, dtype)
        nbytes = (2 * b * ctx * KVH * D + 2 * b * H * D) * elem  # K and V of every context token, q and out
        row = {"batch": b, "ctx": ctx, "mbytes": nbytes / 2**20}
        for name, be in backends.items():
            t = forward_ms(be, case)
            row[f"{name}_ms"] = t
            row[f"{name}_gb_s"] = nbytes / (t / 1e3) / 1e9
            row[f"{name}_frac_of_copy_bw"] = nbytes / (t / 1e3) / bandwidth
        out.append(row)
        print("decode:", row, flush=True)
        del case
    return out


def bench_prefill(backends: dict, dtype: torch.dtype) -> list[dict]:
    out = []
    for cached, new in PREFILLS:
        case = batch([(cached, new)], dtype)
        flops = 4 * H * D * new * (cached + (new + 1) / 2)  # QK^T and PV over the causal context
        row = {"cached": cached, "new": new}
        for name, be in backends.items():
            t = forward_ms(be, case)
            row[f"{name}_ms"] = t
            row[f"{name}_tflops"] = flops / (t / 1e3) / 1e12
        out.append(row)
        print("prefill:", row, flush=True)
    return out


def bench_engine_step(dtype_name: str, bandwidth: float) -> dict:
    from experiments.bench_engine import bench_decode as engine_decode
    from semipd_engine.config import EngineConfig, ModelConfig, freeze
    from semipd_engine.core.engine_core import EngineCore

    out = {}
    for name in ("torch", "triton"):
        core = EngineCore(freeze(ModelConfig, {"name": "llama-100m", "dtype": dtype_name, "device": "cuda",
                                               "attention_backend": name}),
                          freeze(EngineConfig, {"kv_cache_mb": 1024, "max_num_seqs": 64}))
        elem = torch.tensor([], dtype=core.kv.data.dtype).element_size()
        out[name] = engine_decode(core, 32, 256, elem, bandwidth)
        print(f"engine decode step ({name}):", out[name], flush=True)
        del core
        torch.cuda.empty_cache()
    out["speedup"] = out["torch"]["step_s"] / out["triton"]["step_s"]
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dtype", default="float16", choices=["float16", "bfloat16", "float32"])
    ap.add_argument("--skip-engine", action="store_true", help="kernels only")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    if not torch.cuda.is_available():
        print("experiments.bench.attention needs a CUDA GPU (torch.cuda.is_available() is False); nothing was measured.",
              file=sys.stderr)
        return 2
    try:
        from semipd_engine.model.triton_attention import TritonAttention, interpreted
    except ImportError as e:
        print(f"experiments.bench.attention needs triton (pip install triton): {e}", file=sys.stderr)
        return 2
    if interpreted():
        print("TRITON_INTERPRET is set: unset it to time compiled kernels.", file=sys.stderr)
        return 2
    from experiments.benchutil import emit
    from semipd_engine.model.attention import TorchAttention

    dtype = getattr(torch, args.dtype)
    torch.manual_seed(0)
    bw = copy_bandwidth(dtype)
    result = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "dtype": args.dtype,
              "heads": [H, KVH, D], "page": PAGE, "copy_bandwidth_gb_s": bw / 1e9}
    print(f"{result['device']}: copy bandwidth {bw / 1e9:.0f} GB/s (read + write)", flush=True)
    backends = {"triton": TritonAttention(), "torch": TorchAttention()}
    with torch.inference_mode():
        result["decode"] = bench_decode(backends, dtype, bw)
        result["prefill"] = bench_prefill(backends, dtype)
    if not args.skip_engine:
        result["engine_decode_step"] = bench_engine_step(args.dtype, bw)
    emit(result, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
