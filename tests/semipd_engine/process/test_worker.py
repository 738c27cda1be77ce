"""The worker loop, in a thread with plain queues: a request that makes the executor raise is failed alone and
the worker goes on; a worker whose parent is gone exits."""

from __future__ import annotations

import os
import queue
import threading

from semipd_engine.core.block_pool import BlockPool
from semipd_engine.core.engine_core import EngineCore
from semipd_engine.core.messages import AddRequest, Shutdown, StepReport
from semipd_engine.core.policies import POLICIES
from semipd_engine.core.request import Request, SamplingParams
from semipd_engine.core.scheduler import ExecuteResult
from semipd_engine.process.worker import Worker, WorkerSpec


class PoisonedExecutor:
    """Samples token 5 at the end of each request's known tokens; raises on any batch holding 'bad'."""

    def execute(self, batch):
        if any(r.request_id == "bad" for r, _ in batch.items):
            raise RuntimeError("probability tensor contains either `inf`, `nan` or element < 0")
        return ExecuteResult([(r, 5) for r, n in batch.items if r.num_computed_tokens + n == r.num_tokens], 0.0)


def _worker(parent_pid=None):
    core = EngineCore(POLICIES.get("chunked")(BlockPool(64, 4), 8, 32, 256), PoisonedExecutor())
    in_q, out_q = queue.Queue(), queue.Queue()
    return Worker(WorkerSpec("w", "chunked"), core, in_q, out_q, {}, None, parent_pid), in_q, out_q


def test_a_failing_request_does_not_stop_the_worker():
    w, in_q, out_q = _worker(parent_pid=os.getppid())  # this process's parent is alive: the loop goes on
    ids = ["a", "bad", "b"]
    for rid in ids:
        in_q.put(AddRequest(Request(rid, [1, 2, 3, 4, 5, 6], SamplingParams(max_tokens=6, ignore_eos=True))))
    t = threading.Thread(target=w.loop, daemon=True)
    t.start()
    finished = {}
    while len(finished) < 3:
        msg = out_q.get(timeout=10)
        if isinstance(msg, StepReport):
            for o in msg.outputs:
                if o.finished:
                    finished[o.request_id] = o
    # the worker still serves after the failure
    in_q.put(AddRequest(Request("c", [1, 2], SamplingParams(max_tokens=3, ignore_eos=True))))
    while "c" not in finished:
        for o in out_q.get(timeout=10).outputs:
            if o.finished:
                finished[o.request_id] = o
    in_q.put(Shutdown())
    t.join(10)
    assert not t.is_alive()
    assert finished["bad"].finish_reason == "error" and "nan" in finished["bad"].error
    assert all(finished[r].finish_reason == "length" and finished[r].error is None for r in ("a", "b", "c"))
    assert finished["a"].num_output_tokens == 6 and finished["c"].num_output_tokens == 3
    assert w.core.pool.num_used == 0


def test_a_worker_whose_parent_is_gone_exits():
    w, in_q, _ = _worker(parent_pid=os.getpid())  # not this thread's process's parent: as if it had died
    t = threading.Thread(target=w.loop, daemon=True)
    t.start()
    t.join(5)
    assert not t.is_alive()
