"""Where does each engine win on this machine? Read profiles of the real model runner (step time against thread
count) and say how much of an iteration is fixed overhead and how each phase scales with cores.

    python -m semipd_engine.sim.profile --model tiny --out prof/tiny.json
    python -m semipd_engine.sim.profile --model llama-100m --dtype bfloat16 --out prof/llama-100m-bf16.json
    python -m experiments.analysis.profile_study prof/tiny.json prof/llama-100m-bf16.json [--out FILE]

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


def study(profile: dict[str, Any]) -> dict[str, Any]:
    samples = profile["samples"]
    threads = sorted({s["threads"] for s in samples})
    lo, hi = threads[0], threads[-1]
    out: dict[str, Any] = {"model": profile.get("model"), "dtype": profile.get("dtype"), "threads": threads}
    for t in threads:
        row = {"fixed_s": profile["fits"][str(t)]["coef"][0]}
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
    wb = weight_bytes(str(profile.get("model")), str(profile.get("dtype")))
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
        if "weight_mb" in r:
            lines.append(f"  weights {r['weight_mb']:.0f} MiB: a b=1 step streams them at "
                         f"{r[f'decode_b1_weight_gbs_{lo}t']:.1f} GB/s ({lo} thread), "
                         f"{r[f'decode_b1_weight_gbs_{hi}t']:.1f} GB/s ({hi})")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("profiles", nargs="+")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    rows = [study(json.loads(Path(p).read_text())) for p in args.profiles]
    print(format_study(rows))
    if args.out:
        Path(args.out).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
