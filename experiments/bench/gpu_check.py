"""Every claim of this project that needs a GPU, in one command, with one table of what passed.

    python -m experiments.bench.gpu_check [--out DIR] [--timeout-s 540]

On a machine with a CUDA device it runs, each as its own process with a time limit:
- the `gpu`-marked tests (the Triton attention kernels against the torch reference, greedy equality of the engine
  on CUDA with transformers, decode CUDA graphs against eager execution, a green context running kernels on its
  share of the SMs);
- a semi-PD partition switch under load on each SM-share backend that can run here (green contexts in-process;
  MPS by a standby worker started with the new percentage): nothing lost or failed, every switch applied
  (`experiments.bench.semipd --device cuda`);
- a short real sweep (`run.py`, semi-PD on CUDA) that writes the usual results.
It prints one table (check, passed, seconds, the numbers) and writes `gpu_check.json` under `--out`. Where no CUDA
device is present it says so and exits 2; any failed check exits 1.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from dataclasses import asdict, dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
GPU_TESTS = ["tests/semipd_engine/test_gpu.py", "tests/semipd_engine/model/test_triton_attention.py",
             "tests/semipd_engine/shares/test_sm_share.py", "tests/semipd_engine/runtime/test_cuda_graph.py"]


@dataclass
class Check:
    name: str
    passed: bool
    seconds: float
    detail: str


def _run(cmd: list[str], timeout_s: float) -> tuple[int, str, float]:
    t0 = time.monotonic()
    try:
        p = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout_s)
        return p.returncode, p.stdout + p.stderr, time.monotonic() - t0
    except subprocess.TimeoutExpired as e:
        return 124, f"timed out after {timeout_s:.0f} s\n{e.stdout or ''}", time.monotonic() - t0


def gpu_tests(out: Path, timeout_s: float) -> list[Check]:
    xml = out / "gpu_tests.xml"
    rc, log, secs = _run([sys.executable, "-m", "pytest", "-m", "gpu", "-q", f"--junitxml={xml}", *GPU_TESTS],
                         timeout_s)
    if not xml.exists():
        return [Check("gpu tests", False, secs, f"pytest exited {rc} without a report: {log[-500:]}")]
    checks = []
    for case in ET.parse(xml).getroot().iter("testcase"):
        bad = case.find("failure") if case.find("failure") is not None else case.find("error")
        skipped = case.find("skipped")
        detail = ("skipped: " + (skipped.get("message") or "")) if skipped is not None else (
            (bad.get("message") or "failed")[:200] if bad is not None else "ok")
        checks.append(Check(f"test {case.get('name')}", bad is None and skipped is None,
                            float(case.get("time") or 0.0), detail))
    return checks


def switch_under_load(backend: str, out: Path, timeout_s: float) -> Check:
    res_path = out / f"switch_{backend}.json"
    # An MPS switch starts a process (seconds): fewer, further apart, so none is folded into the next.
    switches, interval = ("10", "0.5") if backend == "green_context" else ("5", "6")
    rc, log, secs = _run([sys.executable, "-m", "experiments.bench.semipd", "--device", "cuda", "--backend", backend,
                          "--switches", switches, "--interval", interval, "--out", str(res_path)], timeout_s)
    if rc != 0 or not res_path.exists():
        return Check(f"semi-PD switch under load ({backend})", False, secs, log[-500:])
    r = json.loads(res_path.read_text())
    ok = r["errors"] == 0 and r["worker_applies"] >= r["switches"] and r["requests"] > 0
    return Check(f"semi-PD switch under load ({backend})", ok, secs,
                 f"{r['switches']} switches, {r['worker_applies']} applied, {r['errors']} errors of "
                 f"{r['requests']}; worker stall {r['worker_stall_mean_us']:.0f} us")


def short_sweep(out: Path, timeout_s: float) -> Check:
    rc, log, secs = _run([sys.executable, "run.py", "experiment=single", "engine=semipd", "model.device=cuda",
                          "engine.partition_backend=auto", "workload.num_requests=40", "workload.rate=8",
                          f"results_dir={out / 'results'}", "wandb.mode=disabled"], timeout_s)
    summaries = list((out / "results").rglob("summary.json"))
    ok = rc == 0 and bool(summaries)
    detail = f"results in {summaries[0].parent}" if summaries else log[-500:]
    return Check("short real sweep (semi-PD on CUDA)", ok, secs, detail)


def table(checks: list[Check]) -> str:
    w = max(len(c.name) for c in checks)
    lines = [f"{'check'.ljust(w)}  passed  seconds  detail"]
    lines += [f"{c.name.ljust(w)}  {'yes' if c.passed else 'NO':6}  {c.seconds:7.1f}  {c.detail}" for c in checks]
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=None, help="where the reports go (default: a temporary directory)")
    ap.add_argument("--timeout-s", type=float, default=540.0, help="time limit of each check")
    args = ap.parse_args(argv)
    import torch

    if not torch.cuda.is_available():
        print("gpu_check: no CUDA device here; every check of this command needs one (nothing was run)")
        return 2
    from semipd_engine.shares.sm_share import green_context_available, mps_available

    out = Path(args.out or tempfile.mkdtemp(prefix="gpu_check_"))
    out.mkdir(parents=True, exist_ok=True)
    checks = gpu_tests(out, args.timeout_s)
    # Green contexts are this project's SM shares on any recent torch: not running them is a failure. MPS needs its
    # daemon started by the machine's owner: not running it is a skip.
    for backend, available, miss in (("green_context", green_context_available, "cannot run"),
                                     ("mps", mps_available, "skipped: cannot run")):
        why = available("cuda")
        checks.append(switch_under_load(backend, out, args.timeout_s) if why is None
                      else Check(f"semi-PD switch under load ({backend})", False, 0.0, f"{miss}: {why}"))
    checks.append(short_sweep(out, args.timeout_s))
    print(f"{torch.cuda.get_device_name(0)}, torch {torch.__version__}\n{table(checks)}")
    (out / "gpu_check.json").write_text(json.dumps([asdict(c) for c in checks], indent=2))
    print(f"report: {out / 'gpu_check.json'}")
    return 0 if all(c.passed or c.detail.startswith("skipped") for c in checks) else 1


if __name__ == "__main__":
    sys.exit(main())
