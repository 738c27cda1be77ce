"""The engine core separates policy, executor and clock: policies run without torch, and the same
policy makes the same decisions whether a real model or a fake executor runs its batches."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

from semipd_engine.core.block_pool import BlockPool
from semipd_engine.core.clock import VirtualClock
from semipd_engine.core.engine_core import EngineCore
from semipd_engine.core.policies import POLICIES
from semipd_engine.core.request import Request, SamplingParams, Timestamps
from semipd_engine.core.scheduler import ExecuteResult
from tests.helpers import engine_cfg, model_cfg

DT = 0.005  # seconds per iteration on the fake clock


class FakeExecutor:
    def execute(self, batch):
        return ExecuteResult([(r, 3) for r, n in batch.items if r.num_computed_tokens + n == r.num_tokens], DT)


class Timed:
    """Any executor, with its duration replaced by a fixed tick of the virtual clock."""

    def __init__(self, inner, clock: VirtualClock):
        self.inner, self.clock = inner, clock

    def execute(self, batch):
        result = self.inner.execute(batch)
        self.clock.advance_to(self.clock.now() + DT)
        return ExecuteResult(result.sampled, DT)


ARRIVALS = [(0.0, 12, 6), (0.0, 30, 4), (0.012, 5, 9), (0.02, 40, 3), (0.03, 9, 7), (0.031, 17, 5)]


def _requests():
    return [Request(f"r{i}", [(11 * i + j) % 200 + 10 for j in range(n)],
                    SamplingParams(max_tokens=out, ignore_eos=True, temperature=0.0), times=Timestamps(arrival=t))
            for i, (t, n, out) in enumerate(ARRIVALS)]


def _drive(cores: dict[str, EngineCore], clock: VirtualClock, entry: str) -> list[tuple]:
    """Run the arrival script through one core (unified) or a prefill->decode pair; returns every batch."""
    pending = _requests()
    log = []
    while pending or any(c.has_work() for c in cores.values()):
        while pending and pending[0].times.arrival <= clock.now():
            cores[entry].add_request(pending.pop(0))
        if not any(c.has_work() for c in cores.values()):
            clock.advance_to(pending[0].times.arrival)
            continue
        for name, core in cores.items():
            batch = core.scheduler.schedule(clock.now())
            log.append((name, round(clock.now(), 9), tuple((r.request_id, n) for r, n in batch.items)))
            result = core.executor.execute(batch) if batch else ExecuteResult([], 0.0)
            outcome = core.scheduler.update(batch, result, clock.now())
            for req in outcome.handoffs:
                cores["decode"].adopt(req)
            for req in outcome.evicted:
                cores["prefill"].scheduler.add(req)
    return log


def _cores(policies: list[str], executor_for, clock):
    pool = BlockPool(24, 4)
    return {name: EngineCore(POLICIES.get(policy)(pool, 4, 16, 256), executor_for(pool), clock)
            for name, policy in policies}


SETUPS = {
    "prefill_priority": [("unified", "prefill_priority")],
    "chunked": [("unified", "chunked")],
    "prefill_only+decode_only": [("prefill", "prefill_only"), ("decode", "decode_only")],
}


@pytest.mark.parametrize("setup", list(SETUPS))
def test_same_batches_under_the_real_runner_and_a_fake_executor(setup, llama_checkpoint):
    from semipd_engine.runtime.factory import build_state
    from semipd_engine.runtime.runner import ModelRunner

    state = build_state(model_cfg(llama_checkpoint), engine_cfg(num_kv_blocks=24, block_size=4))
    fake_clock, real_clock = VirtualClock(), VirtualClock()
    fake = _cores(SETUPS[setup], lambda pool: Timed(FakeExecutor(), fake_clock), fake_clock)
    real = _cores(SETUPS[setup], lambda pool: Timed(ModelRunner(state.model, state.kv), real_clock), real_clock)
    entry = SETUPS[setup][0][0]
    fake_log, real_log = _drive(fake, fake_clock, entry), _drive(real, real_clock, entry)
    assert len(real_log) > len(ARRIVALS)
    assert fake_log == real_log
    if setup == "chunked":  # the pool is small enough that the policy must preempt
        assert real["unified"].scheduler.num_preemptions > 0


def test_a_policy_runs_on_a_fake_clock_without_torch():
    code = textwrap.dedent("""
        import sys
        from semipd_engine.core.block_pool import BlockPool
        from semipd_engine.core.clock import VirtualClock
        from semipd_engine.core.engine_core import EngineCore
        from semipd_engine.core.policies import POLICIES
        from semipd_engine.core.request import Request, SamplingParams, Timestamps
        from semipd_engine.core.scheduler import ExecuteResult

        class Fake:
            def __init__(self, clock): self.clock = clock
            def execute(self, batch):
                self.clock.advance_to(self.clock.now() + 0.25)
                return ExecuteResult([(r, 1) for r, n in batch.items if r.num_computed_tokens + n == r.num_tokens], 0.25)

        clock = VirtualClock()
        core = EngineCore(POLICIES.get("chunked")(BlockPool(64, 4), 8, 16, 512), Fake(clock), clock)
        reqs = [Request(f"r{i}", [5] * 20, SamplingParams(max_tokens=4, ignore_eos=True)) for i in range(3)]
        for r in reqs:
            core.add_request(r)
        while core.has_work():
            core.step()
        assert "torch" not in sys.modules, "the policy path imported torch"
        print([r.times.tokens for r in reqs])
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    times = eval(out.stdout)
    # budget 16: r0 prefills over iterations 1-2, r1 and r2 share iterations 2-4; then one token per iteration
    assert times[0] == [0.5, 0.75, 1.0, 1.25]
    assert all(t == sorted(t) and len(t) == 4 for t in times)


class Poisoned:
    """Raises on any batch holding one of `bad` (or on every batch when `bad` is None)."""

    def __init__(self, bad):
        self.bad = bad

    def execute(self, batch):
        if self.bad is None or any(r.request_id in self.bad for r, _ in batch.items):
            raise FloatingPointError("probability tensor contains inf/nan")
        return FakeExecutor().execute(batch)


@pytest.mark.parametrize("policy", ["prefill_priority", "chunked"])
def test_a_failing_request_fails_alone_and_the_core_goes_on(policy):
    core = EngineCore(POLICIES.get(policy)(BlockPool(24, 4), 4, 16, 256), Poisoned({"r1", "r4"}), VirtualClock())
    reqs = _requests()
    for r in reqs:
        core.add_request(r)
    errors = {}
    for _ in range(200):
        if not core.has_work():
            break
        for out in core.step().outputs:
            if out.error:
                errors[out.request_id] = out
    assert set(errors) == {"r1", "r4"}
    assert all(o.finished and o.finish_reason == "error" and "inf/nan" in o.error for o in errors.values())
    for r in reqs:
        if r.request_id in errors:
            assert r.finish_reason.value == "error" and not r.block_table
        else:
            assert len(r.output_token_ids) == r.params.max_tokens and r.finish_reason.value == "length"
    assert core.pool.num_used == 0 and not core.has_work()


def test_a_systematic_fault_fails_every_request_and_frees_every_block():
    core = EngineCore(POLICIES.get("chunked")(BlockPool(24, 4), 4, 16, 256), Poisoned(None), VirtualClock())
    for r in _requests():
        core.add_request(r)
    failed = set()
    for _ in range(50):
        if not core.has_work():
            break
        failed |= {o.request_id for o in core.step().outputs if o.error}
    assert failed == {f"r{i}" for i in range(len(ARRIVALS))}
    assert core.pool.num_used == 0 and not core.has_work()
