"""The `profile` cost model: iteration times measured on this project's real engine, on this machine.

`python -m semipd_engine.sim.profile --model tiny --out profiles/tiny.json` runs the real model runner
over a grid of batch shapes (prefills with and without a cached prefix, decode batches over context
lengths, mixed batches) at every thread count of interest (a semi-PD worker's or disaggregated
instance's core share), and writes the raw samples plus, per thread count, a non-negative least-squares
fit of

    t = c0 + c1*prefill_tokens + c2*prefill_attn_pairs + c3*prefill_seqs + c4*decode_seqs
          + c5*decode_ctx_tokens + c6*sampled

(the terms the roofline has: per-token GEMMs, causal attention, per-sequence and per-context costs, the
LM head, and a fixed per-iteration overhead). `ProfileCostModel` reads it back without torch. The
simulator's validation replays the same workload on the real engine and compares.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from dataclasses import dataclass
from pathlib import Path

from semipd_engine.sim.batch import BaseCostModel, BatchShape

TERMS = ("fixed", "prefill_tokens", "prefill_attn_pairs", "prefill_seqs", "decode_seqs", "decode_ctx_tokens",
         "sampled")


def features(s: BatchShape) -> list[float]:
    return [1.0, s.prefill_tokens, s.prefill_attn_pairs, s.prefill_seqs, s.decode_seqs, s.decode_ctx_tokens,
            s.sampled]


@dataclass(frozen=True)
class ProfileCostModel(BaseCostModel):
    coef: tuple[float, ...]
    threads: int
    name: str = "profile"

    def iteration_time(self, shape: BatchShape) -> float:
        c = self.coef
        return (c[0] + c[1] * shape.prefill_tokens + c[2] * shape.prefill_attn_pairs + c[3] * shape.prefill_seqs
                + c[4] * shape.decode_seqs + c[5] * shape.decode_ctx_tokens + c[6] * shape.sampled)


class Profile:
    """A profile file: fitted coefficients per thread count, and the samples behind them."""

    def __init__(self, data: dict):
        self.data = data
        # The serving stack's own cost on this machine (server, IPC, streaming, client: `serving` block, measured
        # by experiments.bench.sim_validation --calibrate): per iteration, per streamed token, and per request.
        serving = data.get("serving") or {}
        self.fixed_s, self.per_token_s = serving.get("fixed_s", 0.0), serving.get("per_token_s", 0.0)
        self.request_s = serving.get("request_s", 0.0)
        self.fits = {}
        for k, v in data["fits"].items():
            c = list(v["coef"])
            c[0] += self.fixed_s
            c[6] += self.per_token_s
            self.fits[int(k)] = tuple(c)

    @classmethod
    def load(cls, path: str | os.PathLike) -> Profile:
        p = Path(path)
        if not p.is_file():
            raise ValueError(f"backend.profile_path: no profile at {p}; make one with "
                             f"`python -m semipd_engine.sim.profile --model NAME --out {p}`")
        return cls(json.loads(p.read_text()))

    @property
    def thread_counts(self) -> list[int]:
        return sorted(self.fits)

    @property
    def cores(self) -> int:
        """Cores of the machine the profile measured: the CPU a `profile` simulation models, whatever cores the
        simulation itself runs on (so a simulated job needs one core, and a sweep can run several at once)."""
        return int((self.data.get("machine") or {}).get("cores") or max(self.fits))

    def cost_model(self, threads: int) -> ProfileCostModel:
        if threads not in self.fits:  # the nearest profiled count below (never an extrapolation upwards)
            below = [t for t in self.fits if t <= threads] or [min(self.fits)]
            threads = max(below)
        return ProfileCostModel(self.fits[threads], threads)

    def raw_cost_model(self, threads: int) -> ProfileCostModel:
        """The model runner's time alone, without the serving stack's overhead."""
        return ProfileCostModel(tuple(self.data["fits"][str(threads)]["coef"]), threads)

    def share_factor(self, phase: str, threads: int, full: int) -> float:
        """Median slowdown of `phase`-shaped samples at `threads` against `full` threads."""
        lo, hi = self.raw_cost_model(threads), self.raw_cost_model(full)
        shapes = [BatchShape(**s["shape"]) for s in self.data["samples"]
                  if s["threads"] == full and s["kind"] == phase]
        if not shapes:
            return 1.0
        return statistics.median(lo.iteration_time(s) / hi.iteration_time(s) for s in shapes)


def fit(samples: list[dict]) -> tuple[float, ...]:
    import numpy as np
    from scipy.optimize import nnls

    x = np.array([features(BatchShape(**s["shape"])) for s in samples])
    y = np.array([s["seconds"] for s in samples])
    # Relative error matters (a 1 ms decode step and a 1 s prefill alike): weight each row by 1/y.
    w = 1.0 / np.maximum(y, 1e-6)
    coef, _ = nnls(x * w[:, None], y * w)
    return tuple(float(c) for c in coef)


def grid(max_tokens: int) -> list[tuple[str, list[tuple[int, int]]]]:
    """(kind, [(cached, new) per sequence]) shapes to measure."""
    shapes: list[tuple[str, list[tuple[int, int]]]] = []
    for n in (8, 32, 128, 512, 1024):
        if n <= max_tokens:
            shapes.append(("prefill", [(0, n)]))
            shapes.append(("prefill", [(256, n)]))
    shapes.append(("prefill", [(0, 64)] * 4))
    for b in (1, 4, 16, 32, 64):
        for ctx in (32, 256, 1024):
            shapes.append(("decode", [(ctx, 1)] * b))
    for b, n in ((8, 128), (32, 256)):
        shapes.append(("mixed", [(256, 1)] * b + [(0, n)]))
    return shapes


def measure(model_cfg, engine_cfg, thread_counts: list[int], repeats: int = 5) -> list[dict]:
    import torch

    from semipd_engine.core.request import Request, SamplingParams, Timestamps
    from semipd_engine.core.scheduler import ScheduledBatch
    from semipd_engine.runtime.factory import build_core
    from semipd_engine.sim.executor import batch_shape

    core = build_core(model_cfg, engine_cfg)
    runner, pool = core.executor, core.pool
    samples = []
    for threads in thread_counts:
        torch.set_num_threads(threads)
        for kind, seqs in grid(core.max_model_len - 300):
            items = []
            for i, (cached, new) in enumerate(seqs):
                r = Request(f"p{i}", [5 + (i + j) % 50 for j in range(cached + new)], SamplingParams(),
                            times=Timestamps(arrival=1.0))
                r.block_table = pool.try_allocate(pool.blocks_needed(cached + new, 0))
                if r.block_table is None:
                    raise RuntimeError(f"profile: the KV pool ({engine_cfg.kv_cache_mb} MB) is too small for the grid; "
                                       f"raise --kv-cache-mb")
                if new == 1:
                    r.output_token_ids = [r.prompt_token_ids.pop()]  # a decode: the last token was sampled
                r.num_computed_tokens = cached
                items.append((r, new))
            batch = ScheduledBatch(items)
            times = []
            for _ in range(repeats + 1):
                t0 = time.perf_counter()
                runner.execute(batch)
                times.append(time.perf_counter() - t0)
            for r, _ in items:
                pool.free(r.block_table)
            shape = batch_shape(batch)
            samples.append({"kind": kind, "threads": threads, "seconds": statistics.median(times[1:]),
                            "shape": shape._asdict()})
    return samples


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="tiny", help="model preset name (or use --path)")
    ap.add_argument("--path", default=None, help="a local HF checkpoint directory")
    ap.add_argument("--dtype", default="auto", help="auto (measured: bfloat16 where native, else float32) or a name")
    ap.add_argument("--threads", default=None, help="comma-separated thread counts (default: 1..all cores)")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--kv-cache-mb", type=int, default=512,
                    help="KV pool for the grid's largest batch (a wider model needs more)")
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    from semipd_engine.config import EngineConfig, ModelConfig, freeze
    from semipd_engine.model import dtype as dtypes

    cores = len(os.sched_getaffinity(0))
    threads = [int(t) for t in args.threads.split(",")] if args.threads else list(range(1, cores + 1))
    mcfg, choice = dtypes.resolve(freeze(ModelConfig, {"name": args.model, "path": args.path, "dtype": args.dtype}))
    print(dtypes.describe(choice))
    ecfg = freeze(EngineConfig, {"kv_cache_mb": args.kv_cache_mb})
    t0 = time.time()
    samples = measure(mcfg, ecfg, threads, args.repeats)
    fits = {}
    for t in threads:
        rows = [s for s in samples if s["threads"] == t]
        coef = fit(rows)
        model = ProfileCostModel(coef, t)
        errs = sorted(abs(model.iteration_time(BatchShape(**s["shape"])) / s["seconds"] - 1) for s in rows)
        fits[str(t)] = {"coef": coef, "terms": TERMS, "median_rel_err": errs[len(errs) // 2], "max_rel_err": errs[-1]}
        print(f"threads={t}: fit median |error| {100 * errs[len(errs) // 2]:.1f}%, max {100 * errs[-1]:.1f}%")
    out = {"model": args.path or args.model, "dtype": mcfg.dtype, "dtype_choice": choice.as_dict(), "fits": fits, "samples": samples,
           "machine": {"cpu": platform.processor() or platform.machine(), "cores": cores},
           "command": "python -m semipd_engine.sim.profile " + " ".join(
               f"--{k} {v}" for k, v in vars(args).items() if v is not None),
           "seconds": time.time() - t0}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=1))
    print(f"wrote {args.out} ({len(samples)} samples in {out['seconds']:.0f} s)")


if __name__ == "__main__":
    main()
