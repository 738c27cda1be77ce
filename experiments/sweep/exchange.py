"""A pooled sweep's simulated goodput probes, shared among its workers.

A goodput search is a bisection: the rates one after another, each rate's seeds independent probes. A sweep of a
few searches on a pool of one worker per core (the paper's goodput figure: five searches on two cores) ends with
one search running alone while the other cores idle. Here a search posts the seeds it does not run first as task
files in the sweep's exchange directory; a worker that has no job left runs `serve` (a helper task the launcher
queues after the sweep's jobs), claims posted tasks (an atomic rename) and writes their results back; the search
runs whatever nobody claimed itself, and re-runs a task whose claimer died. A simulation is deterministic, so
the files, rows and results are the same whichever process ran a probe; its log records travel back with its
result and are logged by the job that posted it (into that job's log, not the helper's).

Only simulated probes are posted (a real probe measures the job's own server on the job's cores).
"""

from __future__ import annotations

import contextlib
import logging
import os
import pickle
import time
import traceback
import uuid
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, Optional

from experiments.sweep import cores

log = logging.getLogger(__name__)

POLL_S = 0.01  # a probe takes ~1 s: polling this often costs nothing and loses nothing
_ACTIVE: Optional[Exchange] = None  # the exchange of the job running in this process, set by the launcher


class Exchange:
    """The task, claim and result files of one sweep (`<sweep dir>/.probe_exchange`, removed when it ends)."""

    def __init__(self, root: str | Path):
        self.root = Path(root)
        for d in ("pending", "claimed", "done", "finished"):
            (self.root / d).mkdir(parents=True, exist_ok=True)

    # -- the search's side ------------------------------------------------------------------------------------
    def map(self, fn: Callable[..., Any], calls: Sequence[tuple]) -> list[Any]:
        """`[fn(*args) for args in calls]`, the first here, the others posted; what nobody claims runs here."""
        if len(calls) < 2:
            return [fn(*args) for args in calls]
        ids = [self._post(fn, args) for args in calls[1:]]
        try:
            results = [fn(*calls[0])]
            for task_id, args in zip(ids, calls[1:]):
                results.append(self._collect(task_id, fn, args))
            return results
        finally:
            for task_id in ids:  # a search that failed takes back what nobody started
                with contextlib.suppress(FileNotFoundError):
                    (self.root / "pending" / task_id).unlink()

    def _post(self, fn, args) -> str:
        task_id = f"{time.time_ns():020d}-{uuid.uuid4().hex[:8]}"
        tmp = self.root / f".{task_id}"
        tmp.write_bytes(_dumps((fn, args)))
        os.replace(tmp, self.root / "pending" / task_id)
        return task_id

    def _collect(self, task_id: str, fn, args) -> Any:
        if self._claim(task_id):
            try:
                return fn(*args)
            finally:
                (self.root / "claimed" / f"{task_id}.{os.getpid()}").unlink()
        done = self.root / "done" / task_id
        while not done.is_file():
            if not self._claimer_alive(task_id):  # its worker died: the result will never come
                log.warning("probe %s: the worker that took it is gone; running it here", task_id)
                return fn(*args)
            time.sleep(POLL_S)
        ok, value, records = pickle.loads(done.read_bytes())
        done.unlink()
        for rec in records:
            logging.getLogger(rec.name).handle(rec)
        if not ok:
            raise RuntimeError(f"a probe run by another worker of the sweep failed:\n{value}")
        return value

    def _claimer_alive(self, task_id: str) -> bool:
        for f in (self.root / "claimed").glob(f"{task_id}.*"):
            try:
                os.kill(int(f.suffix[1:]), 0)
                return True
            except (ProcessLookupError, ValueError):
                return False
            except PermissionError:
                return True
        return (self.root / "done" / task_id).is_file()  # written between the two looks

    def _claim(self, task_id: str) -> bool:
        try:
            os.rename(self.root / "pending" / task_id, self.root / "claimed" / f"{task_id}.{os.getpid()}")
            return True
        except FileNotFoundError:
            return False

    # -- the helper's side ------------------------------------------------------------------------------------
    def finished(self, job: Any) -> None:
        (self.root / "finished" / str(job)).touch()

    def serve(self, jobs: int) -> int:
        """Run posted tasks until `jobs` jobs have finished; returns how many it ran."""
        ran = 0
        while len(list((self.root / "finished").iterdir())) < jobs:
            task_id = next((t for t in sorted(p.name for p in (self.root / "pending").iterdir())
                            if self._claim(t)), None)
            if task_id is None:
                time.sleep(POLL_S)
                continue
            claimed = self.root / "claimed" / f"{task_id}.{os.getpid()}"
            fn, args = pickle.loads(claimed.read_bytes())
            with _captured() as records:
                try:
                    outcome = (True, fn(*args))
                except Exception:
                    outcome = (False, traceback.format_exc())
            tmp = self.root / f".{task_id}.done"
            tmp.write_bytes(_dumps((*outcome, records)))
            os.replace(tmp, self.root / "done" / task_id)
            claimed.unlink()
            ran += 1
        return ran


def _dumps(obj: Any) -> bytes:
    # cloudpickle: the frozen configs are classes made at run time (semipd_engine.config.freeze), which pickle
    # cannot find by name; what it writes, pickle reads.
    from joblib.externals import cloudpickle

    return cloudpickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)


@contextlib.contextmanager
def _captured() -> Iterator[list[logging.LogRecord]]:
    """This process's log records, kept (as the posting job's handlers will format them) instead of written to
    whatever log the worker's last job left configured."""
    records: list[logging.LogRecord] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            record.msg, record.args = record.getMessage(), None  # what pickles whatever the arguments were
            if record.exc_info:
                record.exc_text = logging.Formatter().formatException(record.exc_info)
                record.exc_info = None
            records.append(record)

    root = logging.getLogger()
    handlers = root.handlers[:]
    root.handlers = [Keep()]
    try:
        yield records
    finally:
        root.handlers = handlers


def current() -> Optional[Exchange]:
    return _ACTIVE


@contextlib.contextmanager
def active(root: Optional[str | Path], job: Any) -> Iterator[None]:
    """A job's exchange while it runs (none: its probes run here, one after another), and its end recorded."""
    global _ACTIVE
    ex = Exchange(root) if root is not None else None
    _ACTIVE = ex
    try:
        yield
    finally:
        _ACTIVE = None
        if ex is not None:
            ex.finished(job)


def serve(root: str | Path, jobs: int) -> int:
    """A pool task: run other searches' probes, on a core of its own, until the sweep's `jobs` jobs finished."""
    ex = Exchange(root)
    with cores.core_slot(1):
        return ex.serve(jobs)
