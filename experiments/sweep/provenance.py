"""Provenance of a job: code version, configuration, packages, machine."""

from __future__ import annotations

import importlib.metadata
import os
import platform
import subprocess
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]  # the repository root
NVIDIA_GPUS = Path("/proc/driver/nvidia/gpus")  # the driver's page per GPU: Model, IRQ, bus location, ...
PACKAGES = ("torch", "transformers", "tokenizers", "aiohttp", "hydra-core", "numpy", "pandas", "pyarrow",
            "scipy", "wandb", "semipd-harness")


def _git(*args: str) -> str | None:
    try:
        return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, timeout=10,
                              check=True).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None


def machine() -> dict[str, Any]:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    info: dict[str, Any] = {"hostname": platform.node(), "platform": platform.platform(), "cpu": cpu,
                            "cores": os.cpu_count(), "python": platform.python_version()}
    try:
        info["memory_gb"] = round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1)
    except (ValueError, OSError):
        pass
    gpus = _gpus()
    if gpus:
        info["gpus"] = gpus
    return info


def _gpus() -> list[str]:
    """The GPUs' names: torch's where a process already uses it, else the NVIDIA driver's (importing torch to ask,
    ~1 s and ~300 MB, was most of a simulated job's first second)."""
    torch = sys.modules.get("torch")
    if torch is not None:
        return [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())] \
            if torch.cuda.is_available() else []
    names = []
    for f in sorted(NVIDIA_GPUS.glob("*/information")):
        try:
            model = next((ln.split(":", 1)[1].strip() for ln in f.read_text().splitlines()
                          if ln.startswith("Model:")), None)
        except OSError:
            continue
        if model:
            names.append(model)
    return names


def collect(resolved_config: Any = None) -> dict[str, Any]:
    versions = {}
    for p in PACKAGES:
        try:
            versions[p] = importlib.metadata.version(p)
        except importlib.metadata.PackageNotFoundError:
            versions[p] = None
    status = _git("status", "--porcelain")
    return {"git_commit": _git("rev-parse", "HEAD"), "git_dirty": bool(status) if status is not None else None,
            "packages": versions, "machine": machine(), "config": resolved_config}
