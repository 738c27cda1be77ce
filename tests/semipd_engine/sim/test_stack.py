"""Serving-stack host costs, and how a partitioned device prices an iteration (shares, contention, re-pricing)."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from semipd_engine.config import EngineConfig, ModelConfig, freeze
from semipd_engine.sim.batch import BaseCostModel, BatchShape
from semipd_engine.sim.build import Platform, build_simulator, simulate
from semipd_engine.sim.config import BackendConfig, HardwareConfig
from semipd_engine.sim.executor import CostModelExecutor
from semipd_engine.sim.share import ShareModel, ShareModels
from semipd_engine.sim.simulator import LinkConfig, make_requests
from semipd_engine.sim.stack import IDEAL, ServingStack, preset, resolve, stack_names
from semipd_engine.topology.engines import build_topology

PREFILL_PER_TOKEN = 1e-3
DECODE_STEP = 0.01
MEM_FRACTION = 0.25  # of a decode step, bound by HBM


class FakeCost(BaseCostModel):
    """Prefill: 1 ms per token; decode: 10 ms per iteration, a quarter of it HBM-bound."""

    name = "fake"

    def iteration_time(self, shape: BatchShape) -> float:
        return PREFILL_PER_TOKEN * shape.prefill_tokens + (DECODE_STEP if shape.decode_seqs else 0.0)

    def memory_bound_time(self, shape: BatchShape) -> float:
        return MEM_FRACTION * DECODE_STEP if shape.decode_seqs else 0.0


def _engine(name, **kw):
    return freeze(EngineConfig, {"name": name, "max_num_seqs": 64, "max_num_batched_tokens": 4096,
                                 "enable_prefix_caching": False, **kw})


def _fake_sim(engine, stack=IDEAL, shares=ShareModels(ShareModel(1.0, 0.0), ShareModel(1.0, 0.0), 1.0), **kw):
    e = _engine(engine, **kw)
    plat = Platform(cost_for=lambda unit: FakeCost(), devices=1, kv_tokens=1 << 20, share_models=shares,
                    link=LinkConfig(1e12), kv_bytes_per_token=1, max_position_embeddings=1 << 16, describe="fake",
                    request_delay_s=stack.request_s, stack=stack)
    m = freeze(ModelConfig, {"name": "llama3-8b"})
    return simulate(build_topology(e), m, e, plat, freeze(BackendConfig, {"name": "sim"}))


def _run(sim, reqs):
    """reqs: (arrival, prompt, output); returns each request's token times, in request order."""
    a, p, o = zip(*reqs)
    requests = make_requests(list(a), list(p), list(o))
    sim.run(requests)
    return [list(r.times.tokens) for r in requests]


# -- the stack's charges ------------------------------------------------------------------------------------

def test_host_cost_is_charged_per_iteration_sequence_and_token():
    s = ServingStack("x", step_s=1e-3, per_seq_s=1e-4, per_token_s=1e-5)
    mixed = BatchShape.of([(0, 100, True), (50, 1, True), (60, 1, True)])  # one prefill, two decodes
    assert s.host_time(mixed) == pytest.approx(1e-3 + 3 * 1e-4 + 102 * 1e-5)
    assert s.host_time(BatchShape()) == 0.0
    assert s.wall(0.002, 0.005) == pytest.approx(0.007)  # stalls: host before the GPU's work
    assert dataclasses.replace(s, overlap=True).wall(0.002, 0.005) == 0.005  # overlapped: the longer one
    assert dataclasses.replace(s, overlap=True).wall(0.006, 0.005) == 0.006


def test_multistep_pays_the_host_once_per_k_decode_steps_and_every_prefill():
    s = ServingStack("x", step_s=2e-3, per_seq_s=1e-4, per_token_s=3.3e-7, multistep=4)
    decode = BatchShape.of([(50, 1, True)] * 8)
    assert s.host_time(decode) == pytest.approx((2e-3 + 8e-4 + 8 * 3.3e-7) / 4)
    assert s.decode_host_time(8) == s.host_time(decode)  # the fast-forward's arithmetic is the loop's
    assert s.host_time(BatchShape.of([(0, 10, True)])) == pytest.approx(2e-3 + 1e-4 + 10 * 3.3e-7)
    with pytest.raises(ValueError, match="multistep"):
        ServingStack("bad", multistep=0)


def test_per_request_cost_delays_what_the_engine_sees():
    from experiments.sweep.simulated import simulate as simulate_job

    m = freeze(ModelConfig, {"name": "llama3-8b", "dtype": "bfloat16"})
    h = freeze(HardwareConfig, {"name": "a100-80g"})
    ttft = []
    for request_s in (0.0, 0.05):
        backend = freeze(BackendConfig, {"name": "sim", "stack": {"name": "ideal", "request_s": request_s}})
        done, *_ = simulate_job(m, _engine("unified"), h, backend, [0.0, 5.0], [100, 100], [3, 3])
        ttft.append(sorted(r.times.first_token - r.times.arrival for r in done))
    assert ttft[1] == pytest.approx([t + 0.05 for t in ttft[0]])  # counted from the client's send


@pytest.mark.parametrize("overlap", [False, True])
def test_a_simulated_unified_engine_charges_its_stack(overlap):
    stack = ServingStack("x", step_s=0.004, per_seq_s=0.0, overlap=overlap)
    times = _run(_fake_sim("unified", stack), [(0.0, 20, 4)])[0]
    prefill = 20 * PREFILL_PER_TOKEN
    step = max(0.004, DECODE_STEP) if overlap else 0.004 + DECODE_STEP
    first = max(0.004, prefill) if overlap else 0.004 + prefill
    assert times[0] == pytest.approx(first)
    assert np.diff(times) == pytest.approx([step] * 3)


def test_presets_resolve_by_engine_and_the_override_keys_win():
    assert {"ideal", "generic", "vllm-0.6", "distserve", "semipd"} <= set(stack_names())
    ideal = preset("ideal")
    assert ideal.free and ideal.request_s == 0.0
    assert preset("generic").step_s == pytest.approx(1e-3)
    cfg = freeze(BackendConfig, {"name": "sim", "stack": {"name": "auto", "per_seq_s": 1e-5}})
    s = resolve(cfg.stack, "semipd")
    assert s.name == "semipd" and s.per_seq_s == 1e-5
    assert resolve(cfg.stack, "semipd", overhead_s=0.003).step_s == 0.003  # the older key still works
    with pytest.raises(ValueError, match="stack='nope'"):
        preset("nope")


def test_ideal_stack_is_the_roofline_alone_and_generic_adds_one_ms():
    from semipd_engine.sim.hardware import Hardware
    from semipd_engine.sim.roofline import RooflineCostModel
    from semipd_engine.sim.shapes import ModelShape

    old = RooflineCostModel(ModelShape.preset("llama3-8b"), Hardware.preset("a100-80g"))  # 1 ms inside
    device = RooflineCostModel(ModelShape.preset("llama3-8b"), Hardware.preset("a100-80g"), overhead_s=0.0)
    shape = BatchShape.of([(0, 300, True), (500, 1, True), (900, 1, True)])
    assert CostModelExecutor(device, preset("ideal")).alone(CostModelExecutor(device, preset("ideal"))
                                                            .work_of(shape)) == device.iteration_time(shape)
    generic = CostModelExecutor(device, preset("generic"))
    assert generic.alone(generic.work_of(shape)) == pytest.approx(old.iteration_time(shape), rel=1e-12)


def test_every_engine_simulates_under_each_preset():
    m = freeze(ModelConfig, {"name": "llama3-8b", "dtype": "bfloat16"})
    h = freeze(HardwareConfig, {"name": "a100-80g"})
    rng = np.random.default_rng(0)
    arrivals = np.cumsum(rng.exponential(1 / 8, 60))
    for name in stack_names():
        backend = freeze(BackendConfig, {"name": "sim", "stack": {"name": name}})
        for engine, kw in (("unified", {}), ("semipd", {"prefill_share": 60, "decode_share": 60}), ("disagg", {})):
            sim, plat = build_simulator(m, _engine(engine, **kw), h, backend)
            assert plat.stack.name == name
            done = sim.run(make_requests(arrivals + plat.request_delay_s, [200] * 60, [50] * 60))
            assert len(done) == 60


@pytest.mark.parametrize("stack", [ServingStack("ms", step_s=3e-3, per_seq_s=2e-5, per_token_s=3.47e-7, multistep=5),
                                   ServingStack("ov", step_s=8e-3, per_seq_s=5e-5, per_token_s=1.1e-7, overlap=True)])
@pytest.mark.parametrize("engine", ["unified", "semipd"])
def test_fast_forward_stays_exact_under_host_costs(stack, engine):
    m = freeze(ModelConfig, {"name": "llama3-8b", "dtype": "bfloat16"})
    h = freeze(HardwareConfig, {"name": "a100-80g"})
    fields = {f: getattr(stack, f) for f in ("step_s", "per_seq_s", "per_token_s", "overlap", "multistep")}
    rng = np.random.default_rng(1)
    n = 200
    arrivals = np.cumsum(rng.exponential(1 / 10, n))
    prompts = np.clip(rng.lognormal(4.5, 1.0, n).astype(int), 4, 1024)
    outputs = np.clip(rng.lognormal(5.0, 0.9, n).astype(int), 1, 1024)
    out = []
    for ff in (True, False):
        backend = freeze(BackendConfig, {"name": "sim", "fast_forward": ff, "stack": {"name": "ideal", **fields}})
        kw = {"prefill_share": 60, "decode_share": 80} if engine == "semipd" else {}
        sim, _ = build_simulator(m, _engine(engine, **kw), h, backend)
        reqs = make_requests(arrivals, prompts, outputs)
        sim.run(reqs)
        out.append([tuple(r.times.tokens) for r in reqs])
        assert (sim.stats.fast_forwarded > 0) == ff
    assert out[0] == out[1]


# -- a partitioned device: what a share slows, what contention stretches, and when ------------------------

def test_host_time_does_not_slow_with_a_smaller_share():
    stack = ServingStack("x", step_s=0.004)
    times = _run(_fake_sim("semipd", stack, prefill_share=50, decode_share=50), [(0.0, 20, 2)])[0]
    # prefill alone at 50 % of the device: the device part doubles (a/f with a=1), the host part does not
    assert times[0] == pytest.approx(0.004 + 2 * 20 * PREFILL_PER_TOKEN)


def test_contention_stretches_only_the_hbm_bound_part_of_decode():
    shares = ShareModels(ShareModel(1.0, 0.0), ShareModel(1.0, 0.0), contention=1.4)
    # A long prompt arrives just after a short one: its prefill runs beside the short one's decode.
    times = _run(_fake_sim("semipd", IDEAL, shares, prefill_share=50, decode_share=50),
                 [(0.0, 10, 4), (0.0105, 500, 2)])
    gaps = np.diff(times[0])
    stretched = 2 * (DECODE_STEP + 0.4 * MEM_FRACTION * DECODE_STEP)  # share 50 % -> x2; +40 % on the HBM part
    assert gaps[1] == pytest.approx(stretched)  # the whole iteration beside the prefill
    assert stretched < 2 * DECODE_STEP * 1.4  # what stretching the whole iteration would have charged


def test_an_iteration_in_flight_is_repriced_when_the_other_phase_stops():
    # Caps of 100 and 100 overlap: while both run each gets half the device (x2); alone, all of it.
    sim = _fake_sim("semipd", IDEAL, prefill_share=100, decode_share=100)
    times = _run(sim, [(0.0, 10, 3), (0.0101, 200, 2)])
    # request 0: prefill 10 ms alone, then decode iterations; request 1's 200 ms prefill starts at ~10.1 ms
    t0 = 10 * PREFILL_PER_TOKEN
    assert times[0][0] == pytest.approx(t0)
    d1 = times[0][1] - times[0][0]
    # 0.1 ms alone, then the remaining 99 % beside the prefill at half speed
    assert d1 == pytest.approx(0.0001 + 0.99 * 2 * DECODE_STEP, rel=1e-6)
    # request 0 finishes after 3 tokens; from then the prefill runs alone: its remaining work at full speed
    end_decode = times[0][-1]
    done_at_end = (end_decode - 0.0101) / (2 * 200 * PREFILL_PER_TOKEN)  # fraction done at half speed
    expect = end_decode + (1 - done_at_end) * 200 * PREFILL_PER_TOKEN
    assert times[1][0] == pytest.approx(expect, rel=1e-6)
    assert times[1][0] < 0.0101 + 2 * 200 * PREFILL_PER_TOKEN  # sampled once at its start, it would run at half
