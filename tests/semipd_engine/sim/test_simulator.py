"""The simulated engines: the real policy objects on a virtual clock, exact fast-forward, determinism, early errors."""

from __future__ import annotations

import numpy as np
import pytest

from semipd_engine.config import EngineConfig, ModelConfig, freeze
from semipd_engine.control.slo_partitioner import SLOPartitioner
from semipd_engine.core import policies
from semipd_engine.sim.build import build_simulator, sim_engines
from semipd_engine.sim.config import BackendConfig, HardwareConfig
from semipd_engine.sim.simulator import make_request, make_requests

PER_ENGINE = {"unified": {"policy": "prefill_priority"}, "unified_chunked": {"policy": "chunked"},
              "semipd": {"prefill_share": 60, "decode_share": 80},
              "semipd_dynamic": {"prefill_share": 60, "decode_share": 80, "slo_ttft_s": 0.2, "slo_tpot_s": 0.03,
                                 "control_window_s": 2.0}}


def _cfgs(engine, model="llama3-8b", hardware="a100-80g", tp=1, **kw):
    e = {"name": engine, "max_num_seqs": 128, "max_num_batched_tokens": 2048, **PER_ENGINE.get(engine, {}), **kw}
    return (freeze(ModelConfig, {"name": model, "dtype": "bfloat16", "tensor_parallel_size": tp}),
            freeze(EngineConfig, e), freeze(HardwareConfig, {"name": hardware}))


def _workload(n, rate, seed=0):
    rng = np.random.default_rng(seed)
    arrivals = np.cumsum(rng.exponential(1 / rate, n))
    prompts = np.clip(rng.lognormal(4.5, 1.0, n).astype(int), 4, 1024)
    outputs = np.clip(rng.lognormal(5.2, 0.9, n).astype(int), 1, 1024)
    return arrivals, prompts, outputs


def _simulate(engine, n=300, rate=12.0, fast_forward=True, seed=0, decode_group=True, **kw):
    m, e, h = _cfgs(engine, **kw)
    backend = freeze(BackendConfig, {"name": "sim", "fast_forward": fast_forward, "decode_group": decode_group})
    sim, _ = build_simulator(m, e, h, backend)
    done = sim.run(make_requests(*_workload(n, rate, seed)))
    return sim, {r.request_id: (r.times.arrival, r.times.first_token, tuple(r.times.tokens), r.times.finished,
                                len(r.output_token_ids), tuple(r.times.preemptions)) for r in done}


@pytest.mark.parametrize("engine", sim_engines())
@pytest.mark.parametrize("load", ["moderate", "preempting"])
def test_fast_forward_equals_the_step_by_step_loop(engine, load):
    """Both shortcuts (fast-forward, the decode group), alone and together, against the per-request loop."""
    kw = {"rate": 10.0} if load == "moderate" else {"rate": 40.0, "num_kv_blocks": 400}
    slow_sim, slow = _simulate(engine, fast_forward=False, decode_group=False, **kw)
    assert len(slow) == 300 and slow_sim.stats.fast_forwarded == 0
    for ff, group in ((True, True), (False, True), (True, False)):
        sim, got = _simulate(engine, fast_forward=ff, decode_group=group, **kw)
        assert got == slow, (ff, group)  # every token time, bit for bit
        assert (sim.stats.fast_forwarded > 0) == ff
        assert sim.stats.iterations == slow_sim.stats.iterations
        assert sim.stats.kv_peak_blocks == slow_sim.stats.kv_peak_blocks
        if ff and group and load == "moderate":  # stretches went through members' last tokens
            assert sim.stats.finished_in_stretches > 0
    if load == "preempting" and engine != "disagg":
        assert any(v[5] for v in slow.values()), "the small pool should force preemptions"


@pytest.mark.parametrize("engine", sim_engines())
def test_fast_forwarded_finishes_keep_the_server_samples_exact(engine):
    """A stretch that passes a finish ends before the next sample: the queues sampled every quarter second are
    those of the step-by-step loop."""
    def samples(ff):
        m, e, h = _cfgs(engine)
        sim, _ = build_simulator(m, e, h, freeze(BackendConfig, {"name": "sim", "fast_forward": ff}))
        sim.sample_every(0.25)
        sim.run(make_requests(*_workload(300, 4.0)))
        return sim, [(r["time_s"], r["metric"], r["labels"], r["value"]) for r in sim.stats.samples
                     if r["metric"].startswith("requests_")]

    (slow, ref), (fast, got) = samples(False), samples(True)
    assert got == ref and len(ref) > 500
    assert fast.stats.finished_in_stretches > 0 and fast.stats.events < slow.stats.events


@pytest.mark.parametrize("engine", sim_engines())
def test_retiring_a_finished_requests_placeholder_blocks_changes_nothing(engine, monkeypatch):
    """A never-preempted request's placeholder blocks are registered only if looked up (`private_blocks`: retired,
    released, registered as they leave): in a pool small enough to preempt and evict, every token time,
    preemption and prefix hit (preempted requests find their own blocks) is what registering them as they fill
    and freeing them gives."""
    from semipd_engine.core import block_pool

    def run():
        sim, got = _simulate(engine, rate=40.0, num_kv_blocks=400)
        return got, sum(w.scheduler.prefix_hits for w in sim.workers.values())

    retired = run()
    monkeypatch.setattr(block_pool, "private_blocks", lambda req: False)
    assert run() == retired
    assert retired[1] > 0 and any(v[5] for v in retired[0].values())  # disagg: preempted requests find released blocks


@pytest.mark.parametrize("engine", sim_engines())
def test_the_shortcuts_keep_the_prefix_cache_exact(engine):
    """Shared prefixes and conversations whose next turn resends the answer, in a pool small enough to evict:
    the decode group registers the blocks its members fill when the per-request loop would, so every hit, every
    eviction and every token time is the same."""
    rng = np.random.default_rng(5)
    n, system = 120, list(range(1000, 1000 + 96))
    arrivals = np.cumsum(rng.exponential(1 / 14.0, n))
    prompts = [system[: int(rng.integers(0, 97))] + [int(x) for x in rng.integers(0, 500, rng.integers(8, 200))]
               for _ in range(n)]
    outputs = [int(x) for x in rng.integers(2, 120, n)]

    def follow(req, t):  # a second turn for every third request: its whole history and a new message
        i = int(req.request_id.split("-")[1])
        if i % 3 or i >= n:
            return None
        ids = req.prompt_token_ids + req.output_token_ids + [7, 8, 9, 10] * 5
        return make_request(n + i, t + 0.5, len(ids), 30, ids)

    def run(ff, group):
        m, e, h = _cfgs(engine, num_kv_blocks=900)
        backend = freeze(BackendConfig, {"name": "sim", "fast_forward": ff, "decode_group": group})
        sim, _ = build_simulator(m, e, h, backend)
        reqs = [make_request(i, a, len(p), o, p) for i, (a, p, o) in enumerate(zip(arrivals, prompts, outputs))]
        done = sim.run(reqs, follow, n + len(range(0, n, 3)))
        hits = sum(w.scheduler.prefix_hits for w in sim.workers.values())
        return hits, {r.request_id: (tuple(r.times.tokens), r.num_cached_tokens, tuple(r.times.preemptions))
                      for r in done}

    hits, ref = run(False, False)
    assert hits > 0 and len(ref) == n + 40
    assert run(True, True) == (hits, ref)
    assert run(False, True) == (hits, ref)


def test_a_seeded_run_is_deterministic_and_seeds_differ():
    _, a = _simulate("semipd", seed=3)
    _, b = _simulate("semipd", seed=3)
    _, c = _simulate("semipd", seed=4)
    assert a == b and a != c


def test_simulated_engines_run_the_real_policy_objects():
    m, e, h = _cfgs("semipd_dynamic")
    sim, _ = build_simulator(m, e, h, freeze(BackendConfig, {"name": "sim"}))
    assert type(sim.workers["prefill"].scheduler) is policies.POLICIES.get("prefill_only") is policies.PrefillOnly
    assert type(sim.workers["decode"].scheduler) is policies.DecodeOnly
    assert isinstance(sim.control.partitioner, SLOPartitioner)
    assert sim.workers["prefill"].scheduler.pool is sim.workers["decode"].scheduler.pool  # one pool
    m, e, h = _cfgs("disagg")
    sim, _ = build_simulator(m, e, h, freeze(BackendConfig, {"name": "sim"}))
    assert sim.workers["prefill0"].scheduler.pool is not sim.workers["decode0"].scheduler.pool
    sim.run(make_requests(*_workload(50, 5.0)))
    assert sim.stats.transfers == 50 and sim.stats.transfer_bytes > 0


def test_the_partitioner_moves_shares_on_virtual_time():
    # decode-heavy load with a tight TPOT SLO: the controller must give decode more share
    sim, _ = _simulate("semipd_dynamic", n=600, rate=14.0, slo_tpot_s=0.02, slo_ttft_s=5.0, prefill_share=60,
                       decode_share=50)
    moves = [d for d in sim.stats.decisions if d["decode_share"] != d["old_decode_share"]]
    assert moves and moves[0]["decode_share"] > 50 and sim.stats.switches > 0


@pytest.mark.parametrize("override, key", [
    ({"hardware": "a100-120g"}, "hardware.name"),
    ({"tp": 3}, "model.tensor_parallel_size"),
    ({"model": "llama3-70b", "hardware": "a100-40g"}, "does not fit"),
    ({"model": "llama-9b"}, "model.name"),
])
def test_bad_presets_fail_before_anything_runs(override, key):
    m, e, h = _cfgs("unified", **override)
    with pytest.raises(ValueError, match=key.replace(".", r"\.")):
        build_simulator(m, e, h, freeze(BackendConfig, {"name": "sim"}))


def test_disaggregated_instances_take_their_own_tensor_parallelism():
    m, e, h = _cfgs("disagg", prefill_tp=2, decode_tp=1)
    backend = freeze(BackendConfig, {"name": "sim"})
    sim, plat = build_simulator(m, e, h, backend)
    pre, dec = sim.workers["prefill0"], sim.workers["decode0"]
    assert pre.executor.cost.tp == 2 and dec.executor.cost.tp == 1
    assert pre.scheduler.pool.num_blocks > dec.scheduler.pool.num_blocks  # two GPUs of memory, half the weights each
    done = sim.run(make_requests(*_workload(100, 8.0)))
    assert len(done) == 100
    _, same, _ = _cfgs("disagg")
    assert build_simulator(m, same, h, backend)[0].workers["prefill0"].executor.cost.tp == 1
    with pytest.raises(ValueError, match="engine.prefill_tp=3"):
        build_simulator(m, _cfgs("disagg", prefill_tp=3)[1], h, backend)
    with pytest.raises(ValueError, match="engine.prefill_tp"):
        build_simulator(m, _cfgs("unified", prefill_tp=2)[1], h, backend)


def test_a_job_counts_the_gpus_of_each_instance():
    from hydra import compose, initialize_config_dir

    from experiments.sweep import conf_store
    from experiments.sweep.job import Job

    conf_store.register()
    with initialize_config_dir(config_dir=conf_store.CONF_DIR, version_base=None):
        sim = compose("config", overrides=["backend=sim", "model=llama3-8b", "engine=disagg", "engine.prefill_tp=2",
                                           "engine.num_decode_instances=2"])
        real = compose("config", overrides=["engine=disagg", "engine.prefill_tp=2"])
    assert Job.from_cfg(sim).num_gpus == 2 + 2 * 1
    with pytest.raises(ValueError, match="engine.prefill_tp"):
        Job.from_cfg(real)


@pytest.mark.parametrize("engine", ["unified", "disagg", "semipd"])
def test_a_finished_simulation_frees_its_requests_without_a_collection(engine):
    """The simulator's parts refer to each other; its requests (and their token times) must not wait for a
    full collection, which walks every live token list."""
    import gc
    import weakref

    m, e, h = _cfgs(engine)
    sim, _ = build_simulator(m, e, h, freeze(BackendConfig, {"name": "sim"}))
    gc.disable()
    try:
        done = sim.run(make_requests(*_workload(50, 12.0)))
        assert len(done) == 50 and not gc.isenabled()  # run() leaves the caller's choice alone
        refs = [weakref.ref(r) for r in done]
        del done
        assert all(r() is None for r in refs)
    finally:
        gc.enable()


def test_paused_gc_pauses_and_restores():
    import gc

    from semipd_engine.sim.simulator import paused_gc

    assert gc.isenabled()
    with paused_gc():
        assert not gc.isenabled()
        with paused_gc():
            assert not gc.isenabled()
        assert not gc.isenabled()
    assert gc.isenabled()
    with pytest.raises(RuntimeError), paused_gc():
        raise RuntimeError("boom")
    assert gc.isenabled()
