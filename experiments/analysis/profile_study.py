"""Where does each engine win on this machine? Read profiles of the real model runner (step time against thread
count) and say how much of an iteration is fixed overhead and how each phase scales with cores.

    python -m semipd_engine.sim.profile --model tiny --out prof/tiny.json
    python -m semipd_engine.sim.profile --model llama-100m --dtype bfloat16 --out prof/llama-100m-bf16.json
    python -m experiments.analysis.profile_study prof/tiny.json prof/llama-100m-bf16.json [--out FILE]
    python -m experiments.analysis.profile_study --measure llama-100m --dtype bfloat16 --profile-out FILE

For each profile, from its measured samples (medians, not the fit): the per-iteration fixed cost (the fit's
constant term: Python and dispatch work that does not grow with tokens) and its share of a decode step, decode
steps at batch 1 / 16 / 32 with 256-token contexts, a 512-token prefill, and the speed-up from 1 to N threads
for each. The reading: phase splitting (semi-PD at 50/50, disaggregation 1P1D) gives each phase 1/N of the
cores; it pays where the phase it protects (decode) barely slows down on fewer cores and the interference it
removes (a prefill stalling every running decode) is large; unified wins where both phases scale with cores.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any, Optional


def _decode(samples: list[dict], threads: int, batch: int) -> Optional[float]:
    """A decode step of `batch` sequences with 256-token contexts (the middle of the grid's 32 / 256 / 1024)."""
    hits = sorted((s["shape"]["decode_ctx_tokens"], s["seconds"]) for s in samples
                  if s["threads"] == threads and s["kind"] == "decode" and s["shape"]["decode_seqs"] == batch)
    return hits[len(hits) // 2][1] if hits else None


def _prefill(samples: list[dict], threads: int, tokens: int) -> Optional[float]:
    """A fresh prompt of `tokens` tokens (no cached prefix: the fewest attention pairs)."""
    hits = sorted((s["shape"]["prefill_attn_pairs"], s["seconds"]) for s in samples
                  if s["threads"] == threads and s["kind"] == "prefill" and s["shape"]["prefill_tokens"] == tokens
                  and s["shape"]["prefill_seqs"] == 1)
    return hits[0][1] if hits else None


def weight_bytes(model: str, dtype: str) -> Optional[float]:
    """Bytes of weights one decode step streams (every parameter once), from the preset's shape."""
    try:
        from semipd_engine.model.presets import PRESETS
    except ImportError:
        return None
    p = PRESETS.get(model)
    if p is None:
        return None
    h, i, n_layers = p["hidden_size"], p["intermediate_size"], p["num_hidden_layers"]
    kv = h // p["num_attention_heads"] * p["num_key_value_heads"]
    vocab = 4096  # the built-in tokenizer's
    params = n_layers * (2 * h * h + 2 * h * kv + 3 * h * i) + 2 * vocab * h
    return params * {"float32": 4, "bfloat16": 2, "float16": 2}.get(dtype, 4)


def study(prof: dict[str, Any]) -> dict[str, Any]:
    samples = prof["samples"]
    threads = sorted({s["threads"] for s in samples})
    lo, hi = threads[0], threads[-1]
    out: dict[str, Any] = {"model": prof.get("model"), "dtype": prof.get("dtype"), "threads": threads}
    if "host" in prof:
        out["host_foreign_cpu_frac"] = prof["host"].get("foreign_cpu_frac")
    for t in threads:
        row = {"fixed_s": prof["fits"][str(t)]["coef"][0]}
        for b in (1, 16, 32):
            row[f"decode_b{b}_s"] = _decode(samples, t, b)
        row["prefill_512_s"] = _prefill(samples, t, 512)
        d16 = row["decode_b16_s"]
        row["fixed_share_of_decode_b16"] = row["fixed_s"] / d16 if d16 else None
        out[f"threads_{t}"] = row
    a, b = out[f"threads_{lo}"], out[f"threads_{hi}"]
    for k in ("decode_b1_s", "decode_b16_s", "decode_b32_s", "prefill_512_s"):
        if a.get(k) and b.get(k):
            out[f"speedup_{k[:-2]}"] = a[k] / b[k]
    wb = weight_bytes(str(prof.get("model")), str(prof.get("dtype")))
    if wb and a.get("decode_b1_s"):
        out["weight_mb"] = wb / 2**20
        out[f"decode_b1_weight_gbs_{lo}t"] = wb / a["decode_b1_s"] / 1e9
        out[f"decode_b1_weight_gbs_{hi}t"] = wb / b["decode_b1_s"] / 1e9
    return out


def _ms(x) -> str:
    return "-" if x is None else f"{1e3 * x:.2f}"


def format_study(rows: list[dict[str, Any]]) -> str:
    lines = []
    for r in rows:
        lo, hi = r["threads"][0], r["threads"][-1]
        a, b = r[f"threads_{lo}"], r[f"threads_{hi}"]
        lines.append(f"{r['model']} ({r['dtype']}), threads {lo} -> {hi}:")
        for name, key in (("fixed per iteration", "fixed_s"), ("decode b=1 ctx 256", "decode_b1_s"),
                          ("decode b=16 ctx 256", "decode_b16_s"), ("decode b=32 ctx 256", "decode_b32_s"),
                          ("prefill 512 tokens", "prefill_512_s")):
            sp = r.get(f"speedup_{key[:-2]}")
            lines.append(f"  {name:<22} {_ms(a.get(key)):>9} ms -> {_ms(b.get(key)):>9} ms"
                         + (f"   x{sp:.2f} with {hi}/{lo} the cores" if sp else ""))
        share = b.get("fixed_share_of_decode_b16")
        if share is not None:
            lines.append(f"  fixed share of a b=16 decode step at {hi} threads: {100 * share:.0f}%")
        if r.get("host_foreign_cpu_frac") is not None:
            lines.append(f"  other processes used {100 * r['host_foreign_cpu_frac']:.0f}% of the cores during the profile")
        if "weight_mb" in r:
            lines.append(f"  weights {r['weight_mb']:.0f} MiB: a b=1 step streams them at "
                         f"{r[f'decode_b1_weight_gbs_{lo}t']:.1f} GB/s ({lo} thread), "
                         f"{r[f'decode_b1_weight_gbs_{hi}t']:.1f} GB/s ({hi})")
    return "\n".join(lines)


def profile(model: str, dtype: str, kv_cache_mb: int, threads: list[int], repeats: int, out: str) -> dict:
    """`semipd_engine.sim.profile`'s measurement with a KV pool large enough for its grid at this model size
    (its command line fixes 512 MiB, too small for llama-100m's 64 x 1024-token decode shapes), with the host
    check around it: a profile taken while something else used the cores says so."""
    import os
    import platform
    import time

    from experiments.sweep.host import HostMonitor
    from semipd_engine.config import EngineConfig, ModelConfig, freeze
    from semipd_engine.sim.profile import TERMS, fit, measure

    mcfg = freeze(ModelConfig, {"name": model, "dtype": dtype})
    ecfg = freeze(EngineConfig, {"kv_cache_mb": kv_cache_mb})
    t0 = time.time()
    with HostMonitor(max_interference=0.05) as mon:
        samples = measure(mcfg, ecfg, threads, repeats)
    fits = {str(t): {"coef": fit([s for s in samples if s["threads"] == t]), "terms": TERMS} for t in threads}
    data = {"model": model, "dtype": dtype, "fits": fits, "samples": samples, "host": mon.result(),
            "machine": {"cpu": platform.processor() or platform.machine(), "cores": len(os.sched_getaffinity(0))},
            "seconds": time.time() - t0}
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    Path(out).write_text(json.dumps(data, indent=1))
    return data


QUICK_SHAPES = [("decode b=1 ctx 256", [(256, 1)]), ("decode b=16 ctx 256", [(256, 1)] * 16),
                ("decode b=32 ctx 256", [(256, 1)] * 32), ("prefill 64 tokens", [(0, 64)]),
                ("prefill 512 tokens", [(0, 512)])]


def quick(model: str, dtype: str, threads: list[int], repeats: int = 9, kv_cache_mb: int = 1024) -> dict[str, Any]:
    """A few shapes, thread counts interleaved, each timing with its own host check; reports the minimum (the
    run least disturbed) and the median, and how much of the machine others used. For shared machines."""
    import os
    import statistics
    import time

    import torch

    from experiments.sweep.host import HostMonitor
    from semipd_engine.config import EngineConfig, ModelConfig, freeze
    from semipd_engine.core.request import Request, SamplingParams, Timestamps
    from semipd_engine.core.scheduler import ScheduledBatch
    from semipd_engine.runtime.factory import build_core

    core = build_core(freeze(ModelConfig, {"name": model, "dtype": dtype}),
                      freeze(EngineConfig, {"kv_cache_mb": kv_cache_mb}))
    runner, pool = core.executor, core.pool
    rows = []
    for name, seqs in QUICK_SHAPES:
        items = []
        for i, (cached, new) in enumerate(seqs):
            r = Request(f"q{i}", [5 + (i + j) % 50 for j in range(cached + new)], SamplingParams(),
                        times=Timestamps(arrival=1.0))
            r.block_table = pool.try_allocate(pool.blocks_needed(cached + new, 0))
            if new == 1:
                r.output_token_ids = [r.prompt_token_ids.pop()]
            r.num_computed_tokens = cached
            items.append((r, new))
        batch = ScheduledBatch(items)
        times: dict[int, list[float]] = {t: [] for t in threads}
        foreign: dict[int, list[float]] = {t: [] for t in threads}
        for rep in range(repeats + 1):
            for t in threads:
                torch.set_num_threads(t)
                with HostMonitor() as mon:
                    t0 = time.perf_counter()
                    runner.execute(batch)
                    dt = time.perf_counter() - t0
                if rep:  # the first round warms up
                    times[t].append(dt)
                    foreign[t].append(mon.result().get("foreign_cpu_frac", 0.0))
        for r, _ in items:
            pool.free(r.block_table)
        for t in threads:
            rows.append({"shape": name, "threads": t, "min_s": min(times[t]), "median_s": statistics.median(times[t]),
                         "foreign_cpu_frac_median": statistics.median(foreign[t])})
    torch.set_num_threads(len(os.sched_getaffinity(0)))
    return {"model": model, "dtype": dtype, "threads": threads, "rows": rows,
            "layers": __import__("semipd_engine.model.presets", fromlist=["PRESETS"]).PRESETS[model]["num_hidden_layers"]}


def format_quick(q: dict[str, Any]) -> str:
    lo, hi = q["threads"][0], q["threads"][-1]
    by = {(r["shape"], r["threads"]): r for r in q["rows"]}
    lines = [f"{q['model']} ({q['dtype']}), {q['layers']} layers; min (median) of the timings, ms; "
             f"others' share of the cores during them"]
    for name, _ in QUICK_SHAPES:
        a, b = by[(name, lo)], by[(name, hi)]
        lines.append(f"  {name:<22} {lo}t {1e3 * a['min_s']:8.2f} ({1e3 * a['median_s']:.2f})   "
                     f"{hi}t {1e3 * b['min_s']:8.2f} ({1e3 * b['median_s']:.2f})   x{a['min_s'] / b['min_s']:.2f}   "
                     f"others {100 * a['foreign_cpu_frac_median']:.0f}% / {100 * b['foreign_cpu_frac_median']:.0f}%")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("profiles", nargs="*", help="profile JSON files to read")
    ap.add_argument("--out", default=None)
    ap.add_argument("--measure", default=None, metavar="MODEL", help="measure a profile of this preset first")
    ap.add_argument("--dtype", default="auto", help="auto (bfloat16 where this CPU has it natively, else float32)")
    ap.add_argument("--kv-cache-mb", type=int, default=2048)
    ap.add_argument("--threads", default=None, help="comma-separated thread counts (default: 1..all cores)")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--profile-out", default=None, help="where --measure writes its profile")
    ap.add_argument("--quick", default=None, metavar="MODEL",
                    help="a few shapes, thread counts interleaved, minimum of the timings (shared machines)")
    args = ap.parse_args()
    if args.quick or args.measure:
        from semipd_engine.model.dtype import choose, describe

        choice = choose(args.dtype)
        print(describe(choice))
        args.dtype = choice.dtype
    if args.quick:
        import os

        threads = ([int(t) for t in args.threads.split(",")] if args.threads
                   else list(range(1, len(os.sched_getaffinity(0)) + 1)))
        q = quick(args.quick, args.dtype, threads, args.repeats)
        print(format_quick(q))
        if args.out:
            Path(args.out).write_text(json.dumps(q, indent=1))
        return
    if args.measure:
        import os

        threads = ([int(t) for t in args.threads.split(",")] if args.threads
                   else list(range(1, len(os.sched_getaffinity(0)) + 1)))
        path = args.profile_out or f"profile-{args.measure}-{args.dtype}.json"
        data = profile(args.measure, args.dtype, args.kv_cache_mb, threads, args.repeats, path)
        h = data["host"]
        print(f"wrote {path} in {data['seconds']:.0f} s; other processes used {100 * h.get('foreign_cpu_frac', 0):.0f}% "
              f"of the cores meanwhile" + ("" if h.get("valid", True) else " (NOT a quiet measurement)"))
        args.profiles = [path, *args.profiles]
    rows = [study(json.loads(Path(p).read_text())) for p in args.profiles]
    print(format_study(rows))
    if args.out:
        Path(args.out).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
