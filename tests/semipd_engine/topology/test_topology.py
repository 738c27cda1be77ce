"""Engines as data: one topology per engine, run unchanged by the process driver and the event driver."""

from __future__ import annotations

import asyncio
import math
import time

import pytest

from semipd_engine.config import EngineConfig, ModelConfig, freeze
from semipd_engine.core.request import Request, SamplingParams, Timestamps
from semipd_engine.process.engine_client import EngineClient, make_engine
from semipd_engine.sim.build import Platform, build_simulator, sim_engines, simulate
from semipd_engine.sim.config import BackendConfig, HardwareConfig
from semipd_engine.sim.share import ShareModel, ShareModels
from semipd_engine.sim.simulator import LinkConfig, make_requests
from semipd_engine.topology.engines import build_topology, check_engine_config, retarget
from semipd_engine.topology.graph import TOPOLOGIES, PoolNode, Topology, WorkerNode, register
from tests.helpers import engine_cfg, engine_vocab, generate_through, hf_greedy, model_cfg, prompts
from tests.helpers.paced import FixedCost, Paced

SIM = freeze(BackendConfig, {"name": "sim"})
GPU = freeze(HardwareConfig, {"name": "a100-80g"})
PER_ENGINE = {"semipd": {"prefill_share": 50, "decode_share": 50},
              "semipd_dynamic": {"prefill_share": 50, "decode_share": 50, "control_window_s": 1.0},
              "disagg": {"num_prefill_instances": 2, "num_decode_instances": 1}}


def _engine(name, **kw):
    return freeze(EngineConfig, {"name": name, "num_kv_blocks": 256, "block_size": 16, **PER_ENGINE.get(name, {}),
                                 **kw})


def _process_view(client: EngineClient) -> dict:
    """What the process driver would start: workers (with the pool each one allocates from), entry, control."""
    specs = client.worker_specs()
    return {"workers": [(s.name, s.role, s.policy, s.pool, s.handoff, s.decode_peers, s.prefill_peers)
                        for s in specs],
            "entry": [client.entry_worker(None) for _ in specs],
            "partitioned": client.partition_control is not None, "controller": client.controller is not None}


def _event_view(sim) -> dict:
    """The same, read off the simulator's workers (pools by identity: one object per topology pool)."""
    ws = list(sim.workers.values())
    return {"workers": [(w.name, w.role, type(w.scheduler).__name__, id(w.scheduler.pool), w.handoff_kind,
                         w.peers if w.role == "prefill" else (), w.peers if w.role == "decode" else ())
                        for w in ws],
            "entry": [sim.entry[i % len(sim.entry)] for i in range(len(ws))],
            "partitioned": sim.pair is not None, "controller": sim.control is not None}


@pytest.mark.parametrize("name", sim_engines())
def test_both_drivers_build_the_same_topology(name):
    from semipd_engine.core.policies import POLICIES

    e = _engine(name)
    topo = build_topology(e)
    client = EngineClient(freeze(ModelConfig, {"name": "tiny"}), e, topo)
    sim, _ = build_simulator(freeze(ModelConfig, {"name": "llama3-8b", "dtype": "bfloat16"}), e, GPU, SIM)
    proc, ev = _process_view(client), _event_view(sim)
    assert [w[0] for w in proc["workers"]] == [w[0] for w in ev["workers"]] == [w.name for w in topo.workers]
    for p, s in zip(proc["workers"], ev["workers"]):
        assert p[1] == s[1]  # role
        assert POLICIES.get(p[2]).__name__ == s[2]  # the same policy class
        assert p[4:] == s[4:]  # hand-off and peers
    # Pools: workers that share one in the process driver share one object in the simulator, and only they.
    same_proc = {(a[0], b[0]) for a in proc["workers"] for b in proc["workers"] if a[3] == b[3]}
    same_sim = {(a[0], b[0]) for a in ev["workers"] for b in ev["workers"] if a[3] == b[3]}
    assert same_proc == same_sim
    assert proc["entry"] == ev["entry"]
    assert proc["partitioned"] == ev["partitioned"] == (topo.partitioned() is not None)
    assert proc["controller"] == ev["controller"] == (topo.controller is not None)


def test_every_builtin_engine_is_a_registered_topology():
    assert set(sim_engines()) == {"unified", "unified_chunked", "disagg", "semipd", "semipd_dynamic"}
    d = build_topology(_engine("disagg")).describe()
    assert [w["unit"] for w in d["workers"]] == [0, 1, 2]  # each instance its own device
    assert sum(p["kv_fraction"] for p in d["pools"]) == pytest.approx(1.0)
    s = build_topology(_engine("semipd"))
    assert s.shared_weights and {w.pool for w in s.workers} == {"shared"} and s.partitioned() is not None


@pytest.mark.parametrize("nodes, match", [
    (dict(workers=(WorkerNode("p", "prefill", "prefill_only", "a", handoff="adopt", decode_peers=("d",)),
                   WorkerNode("d", "decode", "decode_only", "b", handoff="adopt", prefill_peers=("p",))),
          pools=(PoolNode("a"), PoolNode("b"))), "'adopt' needs one pool"),
    (dict(workers=(WorkerNode("u", "both", "chunked", "x"),), pools=(PoolNode("a"),)), "not declared"),
    (dict(workers=(WorkerNode("p", "prefill", "prefill_only", "a", handoff="adopt", decode_peers=("z",)),),
          pools=(PoolNode("a"),)), "names peer 'z'"),
])
def test_a_topology_that_cannot_run_is_refused(nodes, match):
    with pytest.raises(ValueError, match=match):
        Topology("broken", entry=(nodes["workers"][0].name,), **nodes)


@pytest.mark.parametrize("name, key, value", [
    ("semipd", "policy", "chunked"),  # semi-PD's workers run prefill_only / decode_only whatever it says
    ("disagg", "policy", "chunked"),
    ("unified", "prefill_share", 50),
    ("semipd", "control_window_s", 3.0),  # only semipd_dynamic has a controller
    ("unified_chunked", "num_prefill_instances", 2),
])
def test_a_key_the_engine_does_not_read_fails_naming_it(name, key, value):
    e = freeze(EngineConfig, {"name": name, key: value})
    with pytest.raises(ValueError, match=rf"engine\.{key}=.*does not apply to engine '{name}'"):
        check_engine_config(e)
    with pytest.raises(ValueError, match=rf"engine\.{key}"):
        make_engine(freeze(ModelConfig, {}), e)
    with pytest.raises(ValueError, match=rf"engine\.{key}"):
        build_simulator(freeze(ModelConfig, {"name": "llama3-8b"}), e, GPU, SIM)


def test_a_reference_engine_keeps_the_budgets_and_drops_the_rest():
    e = freeze(EngineConfig, {"name": "semipd", "prefill_share": 50, "decode_share": 50, "kv_cache_mb": 64})
    u = retarget(e, "unified", policy="prefill_priority")
    check_engine_config(u)
    assert (u.name, u.policy, u.kv_cache_mb, u.prefill_share) == ("unified", "prefill_priority", 64, 100)


# -- a composition that exists nowhere else ------------------------------------------------------------------


@pytest.fixture
def two_decoders():
    """semi-PD with two decode workers on its one pool: registered here, run by both drivers unchanged."""

    def semipd_two_decoders(e) -> Topology:
        return Topology(e.name, (
            WorkerNode("prefill", "prefill", "prefill_only", "shared", handoff="adopt",
                       decode_peers=("decode0", "decode1")),
            WorkerNode("decode0", "decode", "decode_only", "shared", handoff="adopt", prefill_peers=("prefill",)),
            WorkerNode("decode1", "decode", "decode_only", "shared", handoff="adopt", prefill_peers=("prefill",)),
        ), (PoolNode("shared"),), entry=("prefill",), shared_weights=True)

    register("semipd_two_decoders")(semipd_two_decoders)
    yield "semipd_two_decoders"
    TOPOLOGIES._entries.pop("semipd_two_decoders")


def test_a_new_composition_runs_on_both_backends(llama_checkpoint, two_decoders):
    ecfg = engine_cfg(name=two_decoders, num_kv_blocks=64, block_size=4, max_num_batched_tokens=32, num_threads=1)
    engine = make_engine(model_cfg(llama_checkpoint), ecfg)
    ps = prompts(engine_vocab(llama_checkpoint))
    outs = asyncio.run(generate_through(engine, ps, 16))
    assert outs == [hf_greedy(llama_checkpoint, p, 16) for p in ps]  # greedy-equal to the model (and unified)
    info = engine.worker_info
    assert len({info[w]["pid"] for w in ("prefill", "decode0", "decode1")}) == 3
    assert engine.states["shared"].pool.num_used == 0  # one pool, every block back

    sim, _ = build_simulator(freeze(ModelConfig, {"name": "llama3-8b", "dtype": "bfloat16"}),
                             freeze(EngineConfig, {"name": two_decoders}), GPU, SIM)
    done = sim.run(make_requests([0.01 * i for i in range(40)], [64] * 40, [16] * 40))
    assert len(done) == 40 and all(len(r.output_token_ids) == 16 for r in done)
    decoded = {w: sim.workers[w].iterations for w in ("decode0", "decode1")}
    assert all(n > 0 for n in decoded.values()), decoded  # hand-offs went round robin to both


# -- the same token times on both drivers ----------------------------------------------------------------------

COST = FixedCost(base_s=0.030, per_token_s=0.0002)
# The 2nd and 3rd arrive during the 1st's prefill; no arrival or hand-off lands within ~10 ms of the end of an
# iteration it could join, so the few ms of IPC by which the process driver lags cannot move a request to
# another batch.
ARRIVALS = (0.0, 0.010, 0.015, 0.055, 0.135, 0.21)
PROMPT_LENS = (24, 40, 16, 56, 32, 20)
OUTPUT_LENS = (8, 12, 6, 10, 8, 5)
PARITY = {"unified": {}, "unified_chunked": {"max_num_batched_tokens": 48},
          "semipd": {"prefill_share": 100, "decode_share": 100, "partition_backend": "none"},
          "disagg": {"num_prefill_instances": 1, "num_decode_instances": 1}}


def _simulated_token_times(ecfg) -> list[list[float]]:
    """The event driver on a platform whose every iteration costs COST, with nothing else charged."""
    plat = Platform(cost_for=lambda unit: COST, devices=1, kv_tokens=ecfg.num_kv_blocks * ecfg.block_size,
                    share_models=ShareModels(ShareModel(0.0, 1.0), ShareModel(0.0, 1.0), 1.0),  # shares cost nothing
                    link=LinkConfig(math.inf), kv_bytes_per_token=1, max_position_embeddings=4096, describe="fixed")
    sim = simulate(build_topology(ecfg), freeze(ModelConfig, {}), ecfg, plat, SIM)
    done = {r.request_id: r for r in sim.run(make_requests(ARRIVALS, PROMPT_LENS, OUTPUT_LENS))}
    return [done[f"sim-{i}"].times.tokens for i in range(len(ARRIVALS))]


async def _paced_token_times(engine, vocab: int) -> list[list[float]]:
    """The process driver, its workers paced to COST; requests added at ARRIVALS; times from the first arrival."""
    await engine.start(120)
    try:
        ps = [[10 + (7 * i + j) % (vocab - 10) for j in range(n)] for i, n in enumerate(PROMPT_LENS)]
        t0 = time.monotonic() + 0.3
        streams = []
        for i, a in enumerate(ARRIVALS):  # in order: requests arriving together are added in index order
            await asyncio.sleep(max(0.0, t0 + a - time.monotonic()))
            params = SamplingParams(max_tokens=OUTPUT_LENS[i], temperature=0.0, ignore_eos=True)
            streams.append(engine.add(Request(f"p{i}", ps[i], params, times=Timestamps(arrival=t0 + a))))
        times: list[list[float]] = []
        for q in streams:
            times.append([])
            while True:
                o = await asyncio.wait_for(q.get(), 60)
                assert o.error is None, o.error
                times[-1] += [t - t0 for t in o.token_times]
                if o.finished:
                    break
        return times
    finally:
        await engine.shutdown()


@pytest.mark.parametrize("name", [*PARITY, "semipd_two_decoders"])
def test_both_drivers_give_the_same_token_times(llama_checkpoint, two_decoders, name):
    """Fixed iteration times on both drivers: the same batches (the tokens stamped with one iteration's end are
    the same tokens of the same requests), the same hand-offs, on processes and on events, and every token at the
    same time but for the process driver's own lag (IPC, a KV copy): a few ms, ~20 on a busy machine, under one
    iteration (30 ms)."""
    ecfg = engine_cfg(name=name, num_kv_blocks=256, block_size=16, num_threads=1, **PARITY.get(name, {}))
    sim = _simulated_token_times(ecfg)
    engine = EngineClient(model_cfg(llama_checkpoint), ecfg, build_topology(ecfg), executor_wrapper=Paced(COST))
    real = asyncio.run(_paced_token_times(engine, engine_vocab(llama_checkpoint)))
    assert [len(t) for t in real] == [len(t) for t in sim] == list(OUTPUT_LENS)
    assert _iterations(real) == _iterations(sim)
    worst = max(abs(a - b) for r, s in zip(real, sim) for a, b in zip(r, s))
    assert worst < 0.030, [[round(a - b, 4) for a, b in zip(r, s)] for r, s in zip(real, sim)]


def _iterations(times: list[list[float]]) -> list[list[tuple[int, int]]]:
    """The tokens each iteration emitted, as (request, token index): those stamped with its end time."""
    by_end: dict[float, list[tuple[int, int]]] = {}
    for i, ts in enumerate(times):
        for k, t in enumerate(ts):
            by_end.setdefault(t, []).append((i, k))
    return sorted(by_end.values())
