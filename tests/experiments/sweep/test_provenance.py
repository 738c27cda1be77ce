"""Provenance of a job: this checkout's commit and state, the installed packages, the machine, the config."""

from __future__ import annotations

import importlib.metadata
import os
import platform
import subprocess

from experiments.sweep import provenance


def _git(*args):
    return subprocess.run(["git", *args], cwd=provenance.ROOT, capture_output=True, text=True, check=True).stdout


def test_collect(monkeypatch):
    monkeypatch.setattr(provenance, "PACKAGES", ("torch", "pandas", "no-such-package-for-provenance"))
    config = {"engine": {"name": "unified"}, "workload": {"rate": 2.0}}
    p = provenance.collect(config)
    assert p["config"] == config
    assert p["git_commit"] == _git("rev-parse", "HEAD").strip()
    assert p["git_dirty"] is bool(_git("status", "--porcelain").strip())
    assert p["packages"] == {"torch": importlib.metadata.version("torch"),
                             "pandas": importlib.metadata.version("pandas"),
                             "no-such-package-for-provenance": None}
    m = p["machine"]
    assert (m["cores"], m["python"], m["hostname"]) == (os.cpu_count(), platform.python_version(), platform.node())
    assert m["cpu"] and m["memory_gb"] > 0


def test_collect_outside_a_git_checkout(tmp_path, monkeypatch):
    monkeypatch.setenv("GIT_CEILING_DIRECTORIES", str(tmp_path.parent))
    monkeypatch.setattr(provenance, "ROOT", tmp_path)
    p = provenance.collect()
    assert p["git_commit"] is None and p["git_dirty"] is None and p["config"] is None


def test_gpus_are_named_without_importing_torch(monkeypatch, tmp_path):
    """A process that has not imported torch reads the driver's pages (a simulated job never needs torch)."""
    import sys

    for i, model in enumerate(("NVIDIA H100 80GB HBM3", "NVIDIA H100 80GB HBM3")):
        (tmp_path / f"0000:0{i}:00.0").mkdir()
        (tmp_path / f"0000:0{i}:00.0" / "information").write_text(f"Model: \t\t {model}\nIRQ:   \t\t 42\n")
    monkeypatch.setattr(provenance, "NVIDIA_GPUS", tmp_path)
    monkeypatch.delitem(sys.modules, "torch", raising=False)
    assert provenance.machine()["gpus"] == ["NVIDIA H100 80GB HBM3"] * 2
    assert "torch" not in sys.modules
    monkeypatch.setattr(provenance, "NVIDIA_GPUS", tmp_path / "none")
    assert "gpus" not in provenance.machine()
