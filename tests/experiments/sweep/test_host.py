"""The host check: CPU time that processes outside the job take on its cores during a run flags the run."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest

from experiments.sweep.host import HostMonitor, _proc_stat

pytestmark = pytest.mark.skipif(not os.path.isfile("/proc/stat"), reason="needs Linux /proc")


def _spin(core: int, seconds: float) -> subprocess.Popen:
    code = (f"import os, time\nos.sched_setaffinity(0, {{{core}}})\nt = time.monotonic()\n"
            f"while time.monotonic() - t < {seconds}:\n    pass\n")
    return subprocess.Popen([sys.executable, "-c", code])


def test_a_run_during_a_cpu_hog_is_flagged_as_interfered():
    core = sorted(os.sched_getaffinity(0))[0]
    job = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])  # the job: idle
    try:
        time.sleep(0.3)
        hog = _spin(core, 1.5)  # not the job's: the test's own child
        time.sleep(0.2)
        with HostMonitor(root_pid=job.pid, cores={core}) as mon:
            time.sleep(1.0)
        hog.wait()
    finally:
        job.kill()
        job.wait()
    res = mon.result()
    assert res["checked"] and not res["valid"]
    assert res["foreign_cpu_frac"] > 0.5, res
    assert res["reasons"][0].startswith("host interference: other processes used")


def test_the_jobs_own_work_is_not_interference():
    """The job's own process tree (here: one busy child) is counted as its own, whatever else runs."""
    core = sorted(os.sched_getaffinity(0))[0]
    engine = _spin(core, 1.6)
    try:
        time.sleep(0.2)
        start = _proc_stat(engine.pid)[1]
        with HostMonitor(root_pid=engine.pid, cores={core}) as mon:
            time.sleep(1.0)
        used = _proc_stat(engine.pid)[1] - start
    finally:
        engine.wait()
    res = mon.result()
    assert used > 0.1 and res["own_cpu_s"] == pytest.approx(used, abs=0.05), res
    assert res["foreign_cpu_s"] == pytest.approx(max(0.0, res["busy_cpu_s"] - res["own_cpu_s"]))
    assert {"busy_cpu_s", "own_cpu_s", "steal_frac", "loadavg_1m_start", "loadavg_1m_end"} <= set(res)


def test_an_attached_local_servers_processes_are_the_jobs_own():
    """A server the job attached to runs outside its process tree; named in `also`, its CPU is not foreign."""
    from experiments.sweep.launch import listening_pid

    core = sorted(os.sched_getaffinity(0))[0]
    job = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])  # the job: idle
    server = subprocess.Popen([sys.executable, "-c",
                               "import http.server, os, threading, time\n"
                               f"os.sched_setaffinity(0, {{{core}}})\n"
                               "s = http.server.HTTPServer(('127.0.0.1', 0), http.server.BaseHTTPRequestHandler)\n"
                               "print(s.server_address[1], flush=True)\n"
                               "t = time.monotonic()\n"
                               "while time.monotonic() - t < 3:\n    pass\n"], stdout=subprocess.PIPE, text=True)
    try:
        port = int(server.stdout.readline())
        assert listening_pid(f"http://127.0.0.1:{port}") == server.pid
        assert listening_pid("http://192.0.2.1:80") is None  # not this machine
        with HostMonitor(root_pid=job.pid, cores={core}, also=(server.pid,)) as mine, \
                HostMonitor(root_pid=job.pid, cores={core}) as blind:
            time.sleep(1.0)
    finally:
        for p in (job, server):
            p.kill()
            p.wait()
    assert mine.result()["valid"] and mine.result()["own_cpu_frac"] > 0.5, mine.result()
    assert not blind.result()["valid"]
