"""Engine benchmark: offline throughput vs transformers, decode vs memory floor, prefill vs matmul peak.

    python -m experiments.bench.engine [--model llama-100m] [--dtype auto|float32|bfloat16] [--out FILE.json]

`--dtype auto` (default) runs bfloat16 where this CPU multiplies it natively and float32 where it would be
emulated (semipd_engine/model/dtype.py); the choice and the two matmul figures behind it are printed and saved.

The machine's matmul peak and memory bandwidth are measured in the same run, so
ratios are side by side on one (noisy) machine.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time

import numpy as np
import torch

from semipd_engine.config import EngineConfig, ModelConfig, freeze
from semipd_engine.core.engine_core import EngineCore
from semipd_engine.core.request import Request, SamplingParams
from semipd_engine.runtime.factory import build_core


def best_of(fn, reps: int) -> float:
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def matmul_peak(dtype: torch.dtype, n: int = 2048) -> float:
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    a @ b
    return 2 * n**3 / best_of(lambda: a @ b, 5)


def memory_bandwidth(mb: int = 512) -> float:
    src = torch.empty(mb * 2**20 // 4, dtype=torch.float32).fill_(1)
    dst = torch.empty_like(src)
    dst.copy_(src)
    return 2 * src.numel() * 4 / best_of(lambda: dst.copy_(src), 5)  # read + write


def sharegpt_like(n: int, seed: int) -> list[tuple[int, int]]:
    """(prompt, output) lengths from the project's synthetic ShareGPT-like workload, with its filters."""
    from experiments.loadgen.workloads import load_workload
    from experiments.sweep.config import WorkloadConfig

    w = load_workload(freeze(WorkloadConfig, {"name": "synthetic", "num_requests": n, "seed": seed}))
    return [(i.prompt_len, i.output_len) for i in w.items]


def bench_throughput(core: EngineCore, hf_path: str | None, lens, dtype: torch.dtype, vocab: int) -> dict:
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(10, vocab, (p,), generator=g).tolist() for p, _ in lens]
    params = [SamplingParams(max_tokens=o, temperature=0.0, ignore_eos=True) for _, o in lens]
    tokens = sum(p + o for p, o in lens)
    t0 = time.perf_counter()
    core.generate(prompts, params)
    engine_s = time.perf_counter() - t0
    out = {"requests": len(lens), "tokens": tokens, "engine_s": engine_s, "engine_tok_s": tokens / engine_s}
    if hf_path:
        from transformers import AutoModelForCausalLM

        hf = AutoModelForCausalLM.from_pretrained(hf_path, dtype=dtype).eval()
        width = max(p for p, _ in lens)
        ids = torch.zeros(len(lens), width, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for i, pr in enumerate(prompts):  # left padding, as generate() expects for decoder-only models
            ids[i, width - len(pr):] = torch.tensor(pr)
            mask[i, width - len(pr):] = 1
        max_new = max(o for _, o in lens)
        t0 = time.perf_counter()
        with torch.inference_mode():
            hf.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_new, min_new_tokens=max_new,
                        do_sample=False, pad_token_id=0)
        out["hf_s"] = time.perf_counter() - t0
        out["hf_tok_s"] = tokens / out["hf_s"]
        out["speedup"] = out["hf_s"] / engine_s
    return out


def bench_decode(core: EngineCore, batch: int, ctx: int, dtype_bytes: int, bandwidth: float) -> dict:
    reqs = [Request(f"d{i}", list(range(10, 10 + ctx)), SamplingParams(max_tokens=10**6, temperature=0.0,
                                                                        ignore_eos=True)) for i in range(batch)]
    for r in reqs:
        core.add_request(r)
    while any(not r.output_token_ids for r in reqs):
        core.step()
    times = []
    for _ in range(20):
        times.append(core.step().duration_s)
    for r in reqs:
        core.abort(r.request_id)
    weight_bytes = sum(p.numel() * p.element_size() for p in core.executor.model.parameters())
    emb = core.executor.model.embed_tokens.weight
    if not core.executor.model.spec.tie_word_embeddings:  # the embedding table is gathered, not streamed
        weight_bytes -= emb.numel() * emb.element_size() - batch * emb.shape[1] * emb.element_size()
    kv_bytes = batch * (ctx + 10) * core.executor.model.spec.kv_bytes_per_token(dtype_bytes)
    floor = (weight_bytes + kv_bytes) / bandwidth
    step = float(np.median(times))
    return {"batch": batch, "ctx": ctx, "step_s": step, "floor_s": floor, "ratio_to_floor": step / floor,
            "weight_mb": weight_bytes / 2**20, "kv_mb": kv_bytes / 2**20}


def bench_prefill(core: EngineCore, n: int, peak: float) -> dict:
    spec = core.executor.model.spec

    def once():
        r = Request("p", list(range(10, 10 + n)), SamplingParams(max_tokens=1, temperature=0.0, ignore_eos=True))
        core.add_request(r)
        while core.has_work():
            core.step()

    once()
    t = best_of(once, 3)
    h, L = spec.hidden_size, spec.num_layers
    dense = spec.num_params() - spec.vocab_size * h * (1 if spec.tie_word_embeddings else 2)
    flops = 2 * dense * n + 2 * spec.vocab_size * h  # logits only for the last token
    flops += L * 2 * 2 * spec.num_heads * spec.head_dim * n * n / 2  # causal QK^T and PV
    return {"tokens": n, "time_s": t, "tflops": flops / t / 1e12, "fraction_of_peak": flops / t / peak}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--model", default="llama-100m")
    ap.add_argument("--dtype", default="auto", help="auto (bfloat16 where native, else float32) or a dtype name")
    ap.add_argument("--requests", type=int, default=32)
    ap.add_argument("--no-hf", action="store_true", help="skip the transformers generate() comparison")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    from semipd_engine.model import dtype as dtypes

    torch.manual_seed(0)
    machine = {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
               "threads": torch.get_num_threads(), "torch": torch.__version__,
               "capability": torch.backends.cpu.get_cpu_capability()}
    mcfg, choice = dtypes.resolve(freeze(ModelConfig, {"name": args.model, "dtype": args.dtype}))
    print(f"dtype: {dtypes.describe(choice)}")
    dtype = getattr(torch, mcfg.dtype)
    peak, bw = matmul_peak(dtype), memory_bandwidth()
    print(f"machine: {machine}; matmul peak {peak / 1e9:.1f} GFLOP/s ({mcfg.dtype}); copy bandwidth {bw / 1e9:.2f} GB/s")
    ecfg = freeze(EngineConfig, {"kv_cache_mb": 1024, "max_num_seqs": 64, "max_num_batched_tokens": 4096})
    core = build_core(mcfg, ecfg)
    hf_path = None
    if not args.no_hf:
        import tempfile

        from semipd_engine.model import load_weights, resolve
        from semipd_engine.model.loader import save_checkpoint

        hf_path = tempfile.mkdtemp(prefix="bench-hf-")
        loaded = resolve(mcfg)
        save_checkpoint(loaded.hf_config, load_weights(mcfg, loaded.spec), hf_path)
    lens = sharegpt_like(args.requests, 0)
    results = {"machine": machine, "matmul_peak_flops": peak, "bandwidth_bytes_s": bw, "model": args.model,
               "dtype": mcfg.dtype, "dtype_choice": choice.as_dict(), "params": core.executor.model.spec.num_params()}
    results["throughput"] = bench_throughput(core, hf_path, lens, dtype, core.executor.model.spec.vocab_size)
    print("throughput:", results["throughput"])
    results["decode"] = bench_decode(core, 32, 256, torch.tensor([], dtype=dtype).element_size(), bw)
    print("decode:", results["decode"])
    results["prefill"] = bench_prefill(core, 2048, peak)
    print("prefill:", results["prefill"])
    if args.out:
        with open(args.out, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
