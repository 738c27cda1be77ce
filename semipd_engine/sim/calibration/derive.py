"""Derive the roofline's per-GPU efficiencies from NVIDIA's measured kernel tables, and report the fit.

The source is the public ``aiconfigurator-core`` wheel (Apache-2.0), which ships per-operator latencies
measured on A100/H100/H200 SXM under vLLM, SGLang and TensorRT-LLM. Only vLLM's bf16 tables are read (this
project models vLLM-style engines); the wheel is a development-time input, never a dependency, and only the
few-KB summary this script writes is kept:

    pip download --no-deps aiconfigurator-core==0.12.0 -d "$WHEELS"   # any folder outside the repository
    python -m semipd_engine.sim.calibration.derive --wheel "$WHEELS"/aiconfigurator_core-0.12.0-*.whl \\
        --out semipd_engine/sim/calibration/gpu.json --report

Each efficiency is fitted where it binds: bandwidth on memory-bound rows first, then the compute efficiency
at each breakpoint as the lowest value whose full roofline (max of both terms and the floor) reaches the
smallest median absolute log error over the rows at that breakpoint. Curves are then raised where needed
so that time never falls as work grows. The report's Llama-shaped GEMM rows are the (n, k) of Llama-3-8B
TP1 / 70B TP4 projections that lie on the tables' grid (8B qkv and o, 70B qkv, o and down).
"""

from __future__ import annotations

import argparse
import datetime as dt
import io
import json
import re
import sys
import zipfile
from pathlib import Path

import numpy as np
import pandas as pd
import yaml

from semipd_engine.sim.hardware import SPECS, Hardware
from semipd_engine.sim.roofline import Ops

PACKAGE, VERSION = "aiconfigurator-core", "0.12.0"
SYSTEMS = {"a100_sxm": "a100-80g", "h100_sxm": "h100", "h200_sxm": "h200"}  # measured system -> spec preset
# vLLM's default attention kernel per architecture: FlashAttention 2 on Ampere, FlashAttention 3 on Hopper.
ATTN_KERNEL = {"a100_sxm": "vllm_flash_attn", "h100_sxm": "vllm_flash_attn_fa3", "h200_sxm": "vllm_flash_attn_fa3"}
# (query heads, KV heads) of one rank for Llama-3 8B and 70B at TP 1, 2, 4, 8: the attention rows fitted.
LLAMA_HEADS = {(32, 8), (16, 4), (8, 2), (4, 1), (64, 8), (32, 4), (16, 2), (8, 1)}
HEAD_DIM = 128
# GEMM (n, k) of Llama-3-8B at TP 1 and Llama-3-70B at TP 4 (qkv, o, gate_up, down, lm_head): the report's rows.
REPORT_GEMMS = {(6144, 4096), (4096, 4096), (28672, 4096), (4096, 14336), (128256, 4096),
                (2560, 8192), (8192, 2048), (14336, 8192), (8192, 7168), (32064, 8192)}
REPORT_HEADS = {(32, 8), (16, 2)}
REPORT_TP = 4
DTYPE_BYTES = 2
GRID = np.geomspace(1e-4, 1.0, 801)


# -- reading the wheel ----------------------------------------------------------------------------------------
class Source:
    """The wheel file or an unpacked copy; paths are relative to the package's ``systems`` folder."""

    def __init__(self, path: str):
        p = Path(path)
        if p.is_file():
            self.zip, self.root = zipfile.ZipFile(p), "aiconfigurator_core/systems/"
            self.names = [n[len(self.root):] for n in self.zip.namelist() if n.startswith(self.root)]
        else:
            cands = [p / "aiconfigurator_core" / "systems", p / "systems", p]
            root = next((c for c in cands if (c / "data").is_dir()), None)
            if root is None:
                raise SystemExit(f"--wheel: {path!r} is neither the wheel nor a folder holding aiconfigurator_core")
            self.zip, self.root = None, root
            self.names = [str(f.relative_to(root)) for f in root.rglob("*") if f.is_file()]
        self.label = p.name

    def read(self, rel: str) -> bytes:
        return self.zip.read(self.root + rel) if self.zip else (self.root / rel).read_bytes()

    def parquet(self, rel: str) -> pd.DataFrame:
        return pd.read_parquet(io.BytesIO(self.read(rel)))

    def newest(self, system: str, family: str, table: str) -> str:
        """The newest vLLM version's table (version folders compared numerically)."""
        pat = re.compile(rf"^data/{system}/{family}/vllm/([^/]+)/{table}\.parquet$")
        found = [(m.group(1), n) for n in self.names if (m := pat.match(n))]
        if not found:
            raise SystemExit(f"no vLLM {table} for {system} in {self.label}")

        def key(v: str):
            return tuple(int(x) for x in re.findall(r"\d+", v)[:3])

        return max(found, key=lambda vn: key(vn[0]))[1]


# -- curve helpers --------------------------------------------------------------------------------------------
def sig(x: float, digits: int = 4) -> float:
    return float(f"{x:.{digits}g}")


def monotone(xs: list[float], ys: list[float], power: float = 1.0) -> list[float]:
    """Raise ys where needed so x**power / y(x) never decreases along the power-law pieces.

    Raising (not lowering) moves the values that were fitted where the term does not bind (they come out as
    the lowest value that fits), so the fit where it binds is kept. A small margin survives rounding.
    """
    out = list(ys)
    for i in range(len(xs) - 2, -1, -1):
        out[i] = max(out[i], out[i + 1] * (xs[i] / xs[i + 1]) ** power * (1 + 3e-3))
    return out


def curve_json(xs, ys, power: float = 1.0) -> dict:
    ys = monotone([float(x) for x in xs], [float(y) for y in ys], power)
    return {"x": [int(x) if float(x).is_integer() else float(x) for x in xs], "y": [sig(y) for y in ys]}


def best_eff(pred_for, meas: np.ndarray) -> float:
    """The lowest efficiency whose predictions reach (within 0.5%) the best median |log(pred / measured)|."""
    errs = np.array([np.median(np.abs(np.log(pred_for(y) / meas))) for y in GRID])
    ok = np.nonzero(errs <= errs.min() * 1.005 + 1e-6)[0]
    return float(GRID[ok[0]])


def interp(curve: dict, x: np.ndarray) -> np.ndarray:
    xs, ys = np.log(curve["x"]), np.log(curve["y"])
    return np.exp(np.interp(np.log(np.maximum(x, 1e-30)), xs, ys))


# -- fits -----------------------------------------------------------------------------------------------------
def gemm_rows(src: Source, system: str) -> tuple[pd.DataFrame, str]:
    rel = src.newest(system, "gemm", "gemm_perf")
    d = src.parquet(rel)
    d = d[(d.gemm_dtype == "bfloat16") & (d.n >= 1024) & (d.k >= 1024)].copy()
    d["t"] = d.latency * 1e-3
    d["flops"] = 2.0 * d.m * d.n * d.k
    d["bytes"] = DTYPE_BYTES * (d.m * d.k + d.k * d.n + d.m * d.n).astype(float)
    return d, rel


def fit_gemm(d: pd.DataFrame, peak: float, bw: float) -> dict:
    small = d[d.m <= 16]
    floor = float(small[small.bytes <= 2**22].t.median())
    mem = small[small.t > 1.5 * floor]
    ach = mem.bytes / (mem.t * bw)
    bx, by = [], []
    for j in range(21, 34):
        sel = (mem.bytes >= 2 ** (j - 0.5)) & (mem.bytes < 2 ** (j + 0.5))
        if sel.sum() >= 3:
            bx.append(2.0**j)
            by.append(float(ach[sel].median()))
    bw_eff = curve_json(bx, by)
    ms = sorted(m for m in d.m.unique() if m & (m - 1) == 0)
    cy = []
    for m in ms:
        r = d[d.m == m]
        tm = np.maximum(r.bytes.values / (bw * interp(bw_eff, r.bytes.values)), floor)
        cy.append(best_eff(lambda y, r=r, tm=tm: np.maximum(r.flops.values / (peak * y), tm), r.t.values))
    return {"compute_eff": curve_json(ms, cy), "bw_eff": bw_eff, "floor_s": sig(floor)}


def attn_rows(src: Source, system: str, table: str) -> tuple[pd.DataFrame, str]:
    rel = src.newest(system, "attention", table)
    d = src.parquet(rel)
    keep = (d.head_dim == HEAD_DIM) & (d.kv_cache_dtype == "bfloat16") & (d.kernel_source == ATTN_KERNEL[system])
    if "window_size" in d:
        keep &= d.window_size == 0
    d = d[keep].copy()
    d = d[[(h, kv) in LLAMA_HEADS for h, kv in zip(d.num_heads, d.num_key_value_heads)]].copy()
    d["t"] = d.latency * 1e-3
    return d, rel


def prefill_terms(d: pd.DataFrame):
    tokens = (d.batch_size * d.isl).astype(float).values
    pairs = (d.batch_size * d.isl * (d.isl + 1) / 2).astype(float).values
    flops = 4.0 * pairs * HEAD_DIM * d.num_heads.values
    nbytes = (2 * tokens * d.num_heads.values + 2 * tokens * d.num_key_value_heads.values) * HEAD_DIM * DTYPE_BYTES
    return tokens, pairs, flops, nbytes


def fit_prefill_attn(d: pd.DataFrame, peak: float, bw: float, ew_eff: float) -> dict:
    """Fresh prompts only (the tables have no cached prefix), so Ops' KV-read bound for chunks never binds."""
    floor = float(d[d.batch_size * d.isl <= 64].t.median())
    xs, ys = [], []
    for isl in sorted(d.isl.unique()):
        r = d[d.isl == isl]
        _, _, flops, nbytes = prefill_terms(r)
        tm = np.maximum(nbytes / (bw * ew_eff), floor)
        xs.append(float(isl))
        ys.append(best_eff(lambda y, flops=flops, tm=tm: np.maximum(flops / (peak * y), tm), r.t.values))
    return {"compute_eff": curve_json(xs, ys, power=1.5), "floor_s": sig(floor)}


def decode_terms(d: pd.DataFrame):
    ctx = (d.step + d.isl).astype(float).values  # the collector's step is the cached length; isl = 1 new token
    seqs = d.batch_size.astype(float).values
    h, kv = d.num_heads.values, d.num_key_value_heads.values
    nbytes = (seqs * ctx * 2 * kv + 2 * seqs * h) * HEAD_DIM * DTYPE_BYTES
    flops = 4.0 * seqs * ctx * h * HEAD_DIM
    return seqs, ctx, flops, nbytes


def fit_decode_attn(d: pd.DataFrame, peak: float, bw: float, pa_eff: dict) -> dict:
    seqs, ctx, flops, nbytes = decode_terms(d)
    kv = d.num_key_value_heads.values
    floor = float(np.median(d.t.values[(seqs <= 16) & (nbytes <= 2**20)]))
    blocky = (ctx <= 16) & (seqs >= 512)
    per_cta = float(np.median(d.t.values[blocky] / (seqs[blocky] * kv[blocky])))
    tc = flops / (peak * interp(pa_eff, ctx))
    tfix = np.maximum(np.maximum(tc, floor), per_cta * seqs * kv)
    xs, ys = [], []
    for j in range(16, 36):
        sel = (nbytes >= 2 ** (j - 0.5)) & (nbytes < 2 ** (j + 0.5))
        if sel.sum() < 3:
            continue
        nb, tf, meas = nbytes[sel], tfix[sel], d.t.values[sel]
        xs.append(2.0**j)
        ys.append(best_eff(lambda y, nb=nb, tf=tf: np.maximum(nb / (bw * y), tf), meas))
    return {"bw_eff": curve_json(xs, ys), "per_cta_s": sig(per_cta), "floor_s": sig(floor)}


def allreduce_rows(src: Source, system: str) -> tuple[pd.DataFrame, str]:
    rel = src.newest(system, "comm", "custom_allreduce_perf")
    d = src.parquet(rel)
    # CUDA-graph replays: how vLLM runs decode (eager rows add ~40 us of host launch per call).
    d = d[(d.backend == "vllm_graph") & (d.allreduce_dtype == "bfloat16")].copy()
    d["t"] = d.latency * 1e-3
    d["bytes"] = d.message_size.astype(float) * DTYPE_BYTES  # message_size counts elements
    return d, rel


def fit_allreduce(d: pd.DataFrame, link_bw: float) -> dict:
    out = {}
    for tp, r in d.groupby("num_gpus"):
        r = r.sort_values("bytes")
        r = r[np.log2(r.message_size).round() % 2 == np.log2(r.message_size.min()).round() % 2]  # every 4x
        lat = float(r[r.bytes <= 8192].t.median())
        wire = 2.0 * (tp - 1) / tp * r.bytes.values
        extra = r.t.values - lat
        eff = np.where(extra > 0.25 * lat, wire / (link_bw * np.maximum(extra, 1e-12)), 1.0)
        eff = np.minimum(eff, 1.0)
        out[str(int(tp))] = {"latency_s": sig(lat), "bw_eff": curve_json(r.bytes.values.tolist(), eff.tolist())}
    return {"tp": out}


def derive(src: Source, today: str, command: str) -> dict:
    systems, files = {}, []
    for system, preset in SYSTEMS.items():
        spec = SPECS[preset]
        peak, bw = spec["peak_flops"], spec["mem_bw"]
        gpu = yaml.safe_load(src.read(f"{system}.yaml"))["gpu"]
        ew = {"bw_eff": float(gpu["mem_bw_empirical_scaling_factor"]),
              "floor_s": float(gpu["mem_empirical_constant_latency"])}
        g, g_rel = gemm_rows(src, system)
        pa, pa_rel = attn_rows(src, system, "context_attention_perf")
        da, da_rel = attn_rows(src, system, "generation_attention_perf")
        ar, ar_rel = allreduce_rows(src, system)
        pa_fit = fit_prefill_attn(pa, peak, bw, ew["bw_eff"])
        da_fit = fit_decode_attn(da, peak, bw, pa_fit["compute_eff"])  # decode's FLOP term borrows prefill's curve
        systems[system] = {
            "device": str(g.device.iloc[0]),
            "vllm_versions": {k: v.split("/")[4] for k, v in
                              (("gemm", g_rel), ("attention", pa_rel), ("allreduce", ar_rel))},
            "attention_kernel": ATTN_KERNEL[system],
            "fractions_of": {"peak_flops": peak, "mem_bw": bw, "link_bw": spec["link_bw"]},
            "gemm": fit_gemm(g, peak, bw),
            "prefill_attn": pa_fit,
            "decode_attn": da_fit,
            "elementwise": ew,
            "allreduce": fit_allreduce(ar, spec["link_bw"]),
        }
        files += [f"aiconfigurator_core/systems/{p}" for p in (f"{system}.yaml", g_rel, pa_rel, da_rel, ar_rel)]
    return {
        "provenance": {
            "package": f"{PACKAGE}=={VERSION} (Apache-2.0), wheel {src.label}",
            "files": files,
            "rows": {
                "gemm": "gemm_dtype == bfloat16 (vLLM's unquantized linear: kernel_source vllm_default on 0.14, "
                        "torch.nn.functional.linear on 0.24), n >= 1024, k >= 1024 (layer-sized weights); all m",
                "attention": f"head_dim == {HEAD_DIM}, bf16 KV cache, no sliding window, vLLM's default kernel "
                             f"per GPU (attention_kernel), (heads, kv_heads) of Llama-3 8B/70B at TP 1-8: "
                             f"{sorted(LLAMA_HEADS)}; generation context = step + isl",
                "allreduce": "vLLM custom all-reduce under CUDA graphs (backend vllm_graph), bf16; "
                             "message_size is in elements",
                "elementwise": "no measured table: the wheel's own systems/<gpu>.yaml constants "
                               "(mem_bw_empirical_scaling_factor, mem_empirical_constant_latency)",
            },
            "latency_unit": "tables are in milliseconds per call per layer; everything here is in seconds",
            "presets": "hardware presets a100-40g and a100-80g use a100_sxm (measured on A100-SXM4-80GB), h100 uses "
                       "h100_sxm, h200 uses h200_sxm; h800 has no measured tables and borrows h100_sxm's efficiencies "
                       "(same die), against its own spec peaks and NVLink",
            "date": today,
            "command": command,
        },
        "systems": systems,
    }


# -- report ---------------------------------------------------------------------------------------------------
def _err(pred: np.ndarray, meas: np.ndarray) -> tuple[int, float, float]:
    e = np.abs(pred / meas - 1.0)
    return len(e), float(np.median(e)), float(np.percentile(e, 90))


def report(src: Source, cal: dict) -> dict:
    out = {}
    for system, preset in SYSTEMS.items():
        hw = Hardware.from_calibration(preset, SPECS[preset], cal["systems"][system], system)
        ops = Ops(hw, DTYPE_BYTES)
        res = {}
        g, _ = gemm_rows(src, system)
        pred = np.array([ops.gemm(int(m), int(n), int(k))[0] for m, n, k in zip(g.m, g.n, g.k)])
        llama = np.array([(n, k) in REPORT_GEMMS for n, k in zip(g.n, g.k)])
        res["gemm"] = (_err(pred[llama], g.t.values[llama]), _err(pred, g.t.values))

        pa, _ = attn_rows(src, system, "context_attention_perf")
        tokens, pairs, _, _ = prefill_terms(pa)
        pred = np.array([ops.prefill_attn(int(b), int(t), p, int(t), int(h), int(kv), HEAD_DIM)[0]
                         for b, t, p, h, kv in zip(pa.batch_size, tokens, pairs, pa.num_heads, pa.num_key_value_heads)])
        llama = np.array([(h, kv) in REPORT_HEADS for h, kv in zip(pa.num_heads, pa.num_key_value_heads)])
        res["prefill_attn"] = (_err(pred[llama], pa.t.values[llama]), _err(pred, pa.t.values))

        da, _ = attn_rows(src, system, "generation_attention_perf")
        seqs, ctx, _, _ = decode_terms(da)
        pred = np.array([ops.decode_attn(int(s), int(s * c), int(h), int(kv), HEAD_DIM)[0]
                         for s, c, h, kv in zip(seqs, ctx, da.num_heads, da.num_key_value_heads)])
        llama = np.array([(h, kv) in REPORT_HEADS for h, kv in zip(da.num_heads, da.num_key_value_heads)])
        res["decode_attn"] = (_err(pred[llama], da.t.values[llama]), _err(pred, da.t.values))

        ar, _ = allreduce_rows(src, system)
        pred = np.array([ops.allreduce(b, int(tp)) for b, tp in zip(ar.bytes, ar.num_gpus)])
        llama = (ar.num_gpus == REPORT_TP).values & (ar.bytes >= 8192 * DTYPE_BYTES).values  # >= one 70B token
        res["allreduce"] = (_err(pred[llama], ar.t.values[llama]), _err(pred, ar.t.values))
        out[system] = res
    return out


def print_report(rep: dict, file=sys.stdout) -> None:
    print("abs relative error of roofline vs measured latency: Llama-shaped rows (8B TP1, 70B TP4) | all fitted rows",
          file=file)
    print(f"{'gpu':10} {'op':13} {'rows':>5} {'median':>7} {'p90':>7} | {'rows':>5} {'median':>7} {'p90':>7}",
          file=file)
    for system, res in rep.items():
        for op, ((n1, m1, p1), (n2, m2, p2)) in res.items():
            print(f"{system:10} {op:13} {n1:5d} {m1:7.1%} {p1:7.1%} | {n2:5d} {m2:7.1%} {p2:7.1%}", file=file)


def dumps(obj: dict) -> str:
    """Indented JSON with each list of numbers on one line: small, and diffs show which curve moved."""
    text = json.dumps(obj, indent=1)
    flat = re.sub(r"\[\s*([-0-9.e+,\s]+?)\s*\]",
                  lambda m: "[" + ", ".join(x.strip() for x in m.group(1).split(",")) + "]", text)
    return flat + "\n"


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--wheel", required=True, help="the aiconfigurator-core wheel, or a folder it was unpacked in")
    ap.add_argument("--out", help="where to write the calibration JSON")
    ap.add_argument("--report", action="store_true", help="print the fit error table")
    args = ap.parse_args(argv)
    src = Source(args.wheel)
    command = ("python -m semipd_engine.sim.calibration.derive --wheel aiconfigurator_core-0.12.0-*.whl "
               "--out semipd_engine/sim/calibration/gpu.json --report")
    cal = derive(src, dt.date.today().isoformat(), command)
    rep = report(src, cal)
    cal["fit_error"] = {
        system: {op: {"llama_rows": a[0], "median": sig(a[1], 3), "p90": sig(a[2], 3),
                      "all_rows": b[0], "all_median": sig(b[1], 3), "all_p90": sig(b[2], 3)}
                 for op, (a, b) in res.items()}
        for system, res in rep.items()
    }
    if args.out:
        Path(args.out).write_text(dumps(cal))
    if args.report or not args.out:
        print_report(rep)


if __name__ == "__main__":
    main()
