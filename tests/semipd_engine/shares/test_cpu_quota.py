"""CPU-time shares: cgroup files written as the kernel reads them (v1 and v2, on fake trees), `auto` falling back
to core sets with the reason, and real groups made, filled and removed where this machine allows it."""

from __future__ import annotations

import logging
import os

import pytest

from semipd_engine.shares import cpu_quota
from semipd_engine.shares.cpu_quota import PERIOD_US, CpuQuota, threads_for
from semipd_engine.shares.partition import resolve_backend


def test_threads_follow_the_cores_a_quota_can_keep_busy():
    assert [threads_for(s, 2) for s in (10, 30, 50, 51, 70, 100)] == [1, 1, 1, 2, 2, 2]
    assert threads_for(25, 8) == 2 and threads_for(100, 8) == 8


def _fake_tree(tmp_path, monkeypatch, version: int):
    root = tmp_path / ("cpu" if version == 1 else "unified")
    root.mkdir()
    if version == 1:
        mounts = [(str(root), "cgroup", {"rw", "cpu"})]
    else:
        (root / "cgroup.controllers").write_text("cpu io memory")
        (root / "cgroup.subtree_control").write_text("")
        mounts = [(str(root), "cgroup2", {"rw"})]
    monkeypatch.setattr(cpu_quota, "_mounts", lambda: mounts)
    monkeypatch.setattr(cpu_quota, "_own_path", lambda v: "/")
    # A kernel makes a group's files when the group is made; a plain folder does not: make them on mkdir.
    real_mkdir = type(root).mkdir

    def mkdir(self, *a, **kw):
        real_mkdir(self, *a, **kw)
        for f in (["cpu.cfs_quota_us", "cpu.cfs_period_us", "cgroup.procs", "cpu.stat"] if version == 1
                  else ["cpu.max", "cgroup.procs", "cpu.stat", "cgroup.subtree_control"]):
            (self / f).touch()

    def rmdir(self):  # and removes them with the group (refused while it holds a process or a child group)
        if (self / "cgroup.procs").is_file() and (self / "cgroup.procs").read_text().strip():
            raise OSError(16, "Device or resource busy")
        for f in self.iterdir():
            if f.is_file():
                f.unlink()
        os.rmdir(self)

    monkeypatch.setattr(type(root), "mkdir", mkdir)
    monkeypatch.setattr(type(root), "rmdir", rmdir)
    return root


@pytest.mark.parametrize("version", [1, 2])
def test_quota_files_are_written_as_the_kernel_reads_them(tmp_path, monkeypatch, version):
    root = _fake_tree(tmp_path, monkeypatch, version)
    q, why = CpuQuota.open()
    assert q is not None and why == "" and q.version == version
    g = q.create("prefill")
    q.set(g, 1.4)
    if version == 1:
        assert (g / "cpu.cfs_period_us").read_text() == str(PERIOD_US)
        assert (g / "cpu.cfs_quota_us").read_text() == str(int(1.4 * PERIOD_US))
    else:
        assert (g / "cpu.max").read_text() == f"{int(1.4 * PERIOD_US)} {PERIOD_US}"
        assert "+cpu" in (root / "cgroup.subtree_control").read_text()
    assert q.quota(g) == pytest.approx(1.4)
    q.set(g, 0.01)  # the kernel's floor is 1 ms a period
    assert q.quota(g) == pytest.approx(1000 / PERIOD_US)
    q.attach(g, 12345)
    assert (g / "cgroup.procs").read_text() == "12345"
    (g / "cgroup.procs").write_text("")  # the process exited
    q.remove()
    assert not q.engine_dir().exists()


def test_groups_of_a_server_that_died_are_swept(tmp_path, monkeypatch):
    root = _fake_tree(tmp_path, monkeypatch, 1)
    q, _ = CpuQuota.open()
    dead = root / f"{cpu_quota.PREFIX}999999999-0"  # no such process
    (dead / "decode").mkdir(parents=True)
    q.create("prefill")
    assert not dead.exists() and q.engine_dir().is_dir()
    other, _ = CpuQuota.open()  # a second engine in this process: a folder of its own
    other.create("prefill")
    q.remove()
    assert other.engine_dir().is_dir() and not q.engine_dir().exists()


def test_auto_falls_back_to_core_sets_and_says_why(monkeypatch, caplog):
    monkeypatch.setattr(cpu_quota, "_mounts", lambda: [])
    with caplog.at_level(logging.WARNING):
        assert resolve_backend("auto", "cpu") == "cpu_affinity"
    assert "cpu_quota unavailable (no cgroup cpu controller is mounted)" in caplog.text
    with caplog.at_level(logging.WARNING):  # asked for by name: uncapped, and why
        assert resolve_backend("cpu_quota", "cpu") == "none"


def test_a_read_only_controller_is_refused_with_the_reason(tmp_path, monkeypatch):
    root = _fake_tree(tmp_path, monkeypatch, 1)
    os.chmod(root, 0o555)
    try:
        if os.access(root, os.W_OK):  # root ignores the mode bits: refuse the write another way
            monkeypatch.setattr(CpuQuota, "_probe", lambda self: (_ for _ in ()).throw(PermissionError(13, "denied")))
        q, why = CpuQuota.open()
        assert q is None and "cgroup v1" in why
    finally:
        os.chmod(root, 0o755)


@pytest.mark.skipif(CpuQuota.open()[0] is None, reason="no writable cgroup cpu controller here")
def test_a_real_group_holds_a_process_and_goes_away():
    import subprocess
    import sys

    q, _ = CpuQuota.open()
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        g = q.create("probe-worker")
        q.set(g, 0.3)
        q.attach(g, child.pid)
        assert str(child.pid) in (g / "cgroup.procs").read_text().split()
        assert q.quota(g) == pytest.approx(0.3)
        q.remove()  # moves the live process back to the parent first
        assert not q.engine_dir().exists() and child.poll() is None
    finally:
        child.kill()
        child.wait()
