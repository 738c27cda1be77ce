"""The probe exchange: a search's posted probes run in another process and come back in order, with their logs and
their failures; what nobody takes, or whose taker died, runs in the search's own process."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from experiments.sweep import exchange
from experiments.sweep.exchange import Exchange

ROOT = Path(__file__).resolve().parents[3]
log = logging.getLogger(__name__)


def where(x: int, slow_s: float = 0.0) -> tuple[int, int]:
    """(x squared, the process that ran it); logs a line."""
    time.sleep(slow_s)
    log.warning("probe %d ran in %d", x, os.getpid())
    return x * x, os.getpid()


def fails(x: int) -> None:
    raise ValueError(f"bad probe {x}")


def _helper(root: Path, jobs: int = 1) -> subprocess.Popen:
    code = f"from experiments.sweep import exchange; print(exchange.Exchange({str(root)!r}).serve({jobs}))"
    return subprocess.Popen([sys.executable, "-c", code], cwd=ROOT, stdout=subprocess.PIPE, text=True)


def _left(root: Path) -> list[str]:
    return [p.name for d in ("pending", "claimed", "done") for p in (root / d).iterdir()]


def test_without_a_helper_every_probe_runs_here_in_order(tmp_path):
    ex = Exchange(tmp_path)
    out = ex.map(where, [(1,), (2,), (3,)])
    assert out == [(1, os.getpid()), (4, os.getpid()), (9, os.getpid())]
    assert _left(tmp_path) == []
    assert ex.map(where, [(5,)]) == [(25, os.getpid())] and ex.map(where, []) == []


def test_a_helper_runs_what_is_posted_and_its_log_lines_come_back(tmp_path, caplog):
    helper = _helper(tmp_path)
    try:
        ex = Exchange(tmp_path)
        with caplog.at_level(logging.WARNING):
            # the first runs here, slowly: the helper takes the others meanwhile
            out = ex.map(where, [(2, 1.0), (3,), (4,)])
        ex.finished("job-0")
        assert helper.wait(timeout=30) == 0
    finally:
        helper.kill()
    assert [v for v, _ in out] == [4, 9, 16]
    assert out[0][1] == os.getpid() and {pid for _, pid in out[1:]} == {helper.pid}
    assert int(helper.stdout.read()) == 2
    lines = [r.getMessage() for r in caplog.records if r.name == __name__]
    assert f"probe 3 ran in {helper.pid}" in lines and f"probe 4 ran in {helper.pid}" in lines
    assert _left(tmp_path) == []


def test_a_probe_that_fails_in_a_helper_fails_the_search_with_its_traceback(tmp_path):
    helper = _helper(tmp_path)
    try:
        ex = Exchange(tmp_path)
        with pytest.raises(RuntimeError, match=r"(?s)another worker.*ValueError: bad probe 7"):
            ex.map(lambda x: fails(x) if x == 7 else time.sleep(1.0), [(0,), (7,)])
    finally:
        ex.finished("job-0")
        helper.wait(timeout=30)


def test_a_probe_whose_taker_died_runs_here(tmp_path, caplog):
    ex = Exchange(tmp_path)
    task = ex._post(where, (6,))
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    os.rename(tmp_path / "pending" / task, tmp_path / "claimed" / f"{task}.{dead.pid}")
    with caplog.at_level(logging.WARNING):
        assert ex._collect(task, where, (6,)) == (36, os.getpid())
    assert "the worker that took it is gone" in caplog.text


def test_a_job_sees_its_exchange_only_while_it_runs(tmp_path):
    assert exchange.current() is None
    with exchange.active(tmp_path, 3):
        assert exchange.current().root == tmp_path
    assert exchange.current() is None and (tmp_path / "finished" / "3").is_file()
    with exchange.active(None, 4):
        assert exchange.current() is None
