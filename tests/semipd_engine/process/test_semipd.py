"""semi-PD: phase workers over one copy of the weights and one KV pool, run-time partition switching."""

from __future__ import annotations

import asyncio
import json
import os
import threading
import time
import urllib.error
import urllib.request

import pytest
import torch

from semipd_engine.process.engine_client import make_engine
from semipd_engine.runtime.kv_cache import SharedBlockPool
from tests.helpers import engine_cfg, engine_vocab, generate_through, hf_greedy, model_cfg, prompts, stream_greedy
from tests.helpers.server import ServerProcess, alive, get_json, metric, wait_healthy, worker_pids

TWO_CORES = len(os.sched_getaffinity(0)) >= 2


@pytest.mark.parametrize("num_kv_blocks", [256, 20], ids=["roomy", "preempting"])
def test_greedy_matches_transformers_with_one_shared_pool(llama_checkpoint, num_kv_blocks):
    ecfg = engine_cfg(name="semipd", num_kv_blocks=num_kv_blocks, block_size=4,
                      max_num_batched_tokens=32, prefill_share=50, decode_share=50)
    engine = make_engine(model_cfg(llama_checkpoint), ecfg)
    ps = prompts(engine_vocab(llama_checkpoint))
    outs = asyncio.run(generate_through(engine, ps, 24))
    for p, o in zip(ps, outs):
        assert o == hf_greedy(llama_checkpoint, p, 24)
    # The owner never runs the model: KV bytes in its tensor were written in place by the workers,
    # and its allocator saw every allocation and free of both workers.
    assert engine.states["shared"].kv.data.abs().sum() > 0
    assert engine.states["shared"].pool.num_used == 0
    info = engine.worker_info
    assert info["prefill"]["pid"] != info["decode"]["pid"]
    if TWO_CORES and engine.partition_control.backend == "cpu_affinity":
        assert tuple(info["prefill"]["cores"]) == (0,) and tuple(info["decode"]["cores"]) == (1,)
    elif engine.partition_control.backend == "cpu_quota":  # both unpinned, each under a quota of one core
        assert info["prefill"]["num_threads"] == info["decode"]["num_threads"] == 1


def _hammer(pool, holders, seed, iters, errors):
    """Allocate, cache, find cached and free at random; `holders` counts each block's holders across processes:
    a fresh block must have none, a cached one found by its hash may have several."""
    import random

    rng = random.Random(seed)
    held: list[list[int]] = []
    try:
        for _ in range(iters):
            if held and (rng.random() < 0.5 or pool.num_free < 4):
                blocks = held.pop(rng.randrange(len(held)))
                for b in blocks:
                    holders[b] -= 1
                pool.free(blocks)
                continue
            hit = []
            if pool.prefix_caching:
                h = rng.randrange(16)  # few prefixes: both processes find each other's
                b = pool.cached_block(h)
                if b is not None:
                    hit = [(b, h)]
            got = pool.try_allocate(rng.randint(1, 4), hit=hit)
            if got is None:
                continue
            for b in got:
                if holders[b] != 0:
                    errors[0] += 1  # handed out fresh while another process held it
                holders[b] += 1
            for b, _ in hit:
                holders[b] += 1
            if pool.prefix_caching:
                pool.cache(got[0], rng.randrange(16))
            held.append(got + [b for b, _ in hit])
        for blocks in held:
            for b in blocks:
                holders[b] -= 1
            pool.free(blocks)
    except Exception:
        errors[1] += 1
        raise


@pytest.mark.parametrize("prefix_caching", [False, True], ids=["plain", "prefix_caching"])
def test_allocator_is_atomic_across_processes(prefix_caching):
    import torch.multiprocessing as tmp

    ctx = tmp.get_context("spawn")
    pool = SharedBlockPool(64, 4, 0.0, ctx.Lock(), prefix_caching)
    holders = torch.zeros(64, dtype=torch.int64).share_memory_()
    errors = torch.zeros(2, dtype=torch.int64).share_memory_()
    procs = [ctx.Process(target=_hammer, args=(pool, holders, s, 3000, errors)) for s in (1, 2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
    assert all(p.exitcode == 0 for p in procs)
    assert errors.tolist() == [0, 0], "double allocation or allocator error"
    assert pool.num_free == 64 and not pool.v["ref"].any() and not holders.any()
    if prefix_caching:
        assert 0 < pool.num_cached <= 16


def _quota_writable() -> bool:
    from semipd_engine.shares.cpu_quota import CpuQuota

    return CpuQuota.open()[0] is not None


@pytest.fixture(scope="module", params=["cpu_quota", "cpu_affinity"])
def semipd_server(request, llama_checkpoint):
    if request.param == "cpu_quota" and not _quota_writable():
        pytest.skip("no writable cgroup cpu controller here")
    srv = ServerProcess("engine=semipd", "model=hf", f"model.path={llama_checkpoint}", "engine.kv_cache_mb=8",
                        "engine.block_size=4", f"engine.partition_backend={request.param}")
    srv.backend = request.param
    yield srv
    srv.stop()


def _post(url, body):
    req = urllib.request.Request(url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=120) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def test_switching_every_second_under_load_loses_nothing(semipd_server, llama_checkpoint):
    url = semipd_server.url
    ps = prompts(engine_vocab(llama_checkpoint), seed=5) * 3
    expected = [hf_greedy(llama_checkpoint, p, 20) for p in ps]
    results: dict[int, list[int]] = {}
    stop = threading.Event()

    def switcher():
        shares = [(100, 50), (50, 100), (100, 100), (50, 50)]
        i = 0
        while not stop.is_set():
            x, y = shares[i % len(shares)]
            status, _ = _post(url + "/partition", {"prefill_share": x, "decode_share": y})
            assert status == 200
            i += 1
            stop.wait(1.0)

    def client(i, p):
        status, body = _post(url + "/v1/completions", {"prompt": p, "max_tokens": 20, "temperature": 0,
                                                       "ignore_eos": True, "logprobs": None})
        assert status == 200, body
        results[i] = body

    sw = threading.Thread(target=switcher)
    sw.start()
    threads = []
    for i, p in enumerate(ps):
        t = threading.Thread(target=client, args=(i, p))
        t.start()
        threads.append(t)
        time.sleep(0.15)
    for t in threads:
        t.join(180)
    stop.set()
    sw.join(10)
    assert metric(url, "partition_switches_total") >= 4
    assert get_json(url + "/partition")[1]["backend"] == semipd_server.backend
    assert len(results) == len(ps)
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(llama_checkpoint)
    for i, body in results.items():
        assert body["usage"]["completion_tokens"] == 20
        assert body["choices"][0]["text"] == tok.decode(expected[i], skip_special_tokens=True)
    assert metric(url, "kv_transfer_bytes_total") == 0
    deadline = time.monotonic() + 5
    while metric(url, "kv_blocks_used") and time.monotonic() < deadline:
        time.sleep(0.1)
    assert metric(url, "kv_blocks_used") == 0


def test_partition_endpoint_rejects_bad_shares(semipd_server):
    for body, param in [({"prefill_share": 0}, "prefill_share"), ({"decode_share": 101}, "decode_share"),
                        ({"prefill_share": "50"}, "prefill_share")]:
        status, resp = _post(semipd_server.url + "/partition", body)
        assert status == 400 and resp["error"]["param"] == param


@pytest.mark.parametrize("victims", ["decode", "both"])
def test_dead_workers_are_replaced_and_the_shared_pool_made_whole(llama_checkpoint, victims):
    import http.client

    srv = ServerProcess("engine=semipd", "model=hf", f"model.path={llama_checkpoint}", "engine.kv_cache_mb=8")
    try:
        info = get_json(srv.url + "/health")[1]
        assert info["restarts"] == 0
        conn = http.client.HTTPConnection("127.0.0.1", srv.port, timeout=30)
        conn.request("POST", "/v1/completions", json.dumps({"prompt": [5, 6, 7], "max_tokens": 500, "stream": True,
                                                             "ignore_eos": True}), {"Content-Type": "application/json"})
        resp = conn.getresponse()
        assert resp.status == 200
        for _ in range(3):  # decoding: the request holds blocks of the shared pool
            assert resp.readline().startswith(b"data:")
            resp.readline()
        assert metric(srv.url, "kv_blocks_used") > 0
        kids = worker_pids(srv.proc.pid)
        assert len(kids) == 2
        for k in (kids if victims == "both" else [max(kids)]):  # the decode worker starts second
            os.kill(k, 9)
        rest = resp.read().decode()  # must end, not hang
        assert '"error"' in rest and "[DONE]" in rest
        health = wait_healthy(srv.url, 60)
        assert health["restarts"] == 1 and health["engine"] == "semipd"
        print(f"semi-PD workers replaced in {health['last_restart']['seconds']:.2f}s")
        new = worker_pids(srv.proc.pid)
        assert len(new) == 2 and not set(new) & set(kids) and not alive(kids)
        assert metric(srv.url, "kv_blocks_used") == 0 and metric(srv.url, "worker_restarts_total") == 1
        ps = prompts(engine_vocab(llama_checkpoint), seed=3)[:3]
        for p in ps:  # the new workers run on the owner's weights and KV pool, with a fresh allocator
            status, body = _post(srv.url + "/v1/completions", {"prompt": p, "max_tokens": 8, "temperature": 0,
                                                               "ignore_eos": True})
            assert status == 200 and body["usage"]["completion_tokens"] == 8
        status, _ = _post(srv.url + "/partition", {"prefill_share": 100, "decode_share": 50})
        assert status == 200
        deadline = time.monotonic() + 5
        while metric(srv.url, "kv_blocks_used") and time.monotonic() < deadline:
            time.sleep(0.1)
        assert metric(srv.url, "kv_blocks_used") == 0
    finally:
        srv.stop()


def test_owner_allocator_is_replaced_after_a_worker_dies(llama_checkpoint):
    """In process: blocks held by the dead worker's requests are not lost to the pool that follows."""
    ecfg = engine_cfg(name="semipd", num_kv_blocks=64, block_size=4, prefill_share=50,
                      decode_share=50)
    engine = make_engine(model_cfg(llama_checkpoint), ecfg)
    ps = prompts(engine_vocab(llama_checkpoint))
    expected = [hf_greedy(llama_checkpoint, p, 12) for p in ps]

    async def main():
        from semipd_engine.core.request import Request, SamplingParams

        await engine.start(120)
        try:
            old_pool, model = engine.states["shared"].pool, engine.states["shared"].model
            streams = [engine.add(Request(f"a{i}", p, SamplingParams(max_tokens=200, temperature=0.0,
                                                                     ignore_eos=True))) for i, p in enumerate(ps)]
            for s in streams:  # every request has its first token: all hold blocks
                assert (await asyncio.wait_for(s.get(), 60)).error is None
            held = old_pool.num_used
            assert held > 0
            os.kill(engine.worker_info["decode"]["pid"], 9)
            t0 = time.monotonic()
            errors = []
            for s in streams:
                while True:
                    o = await asyncio.wait_for(s.get(), 10)
                    if o.finished:
                        errors.append(o.error)
                        break
            assert all(e and "worker" in e for e in errors)
            while engine.state != "ready":
                assert engine.state == "restarting"
                await asyncio.sleep(0.05)
            print(f"restart in {time.monotonic() - t0:.2f}s; the old allocator had {held} blocks in use")
            assert engine.restarts == 1 and engine.states["shared"].model is model  # the owner kept the weights
            assert engine.states["shared"].pool is not old_pool and engine.states["shared"].pool.num_used == 0
            outs = await stream_greedy(engine, ps, 12, prefix="b", timeout=60)
            assert outs == expected
            await asyncio.sleep(0.3)
            assert engine.states["shared"].pool.num_used == 0
        finally:
            await engine.shutdown()

    asyncio.run(main())


@pytest.mark.slow  # timing on a shared machine: a few seconds per share, run on its own
@pytest.mark.skipif(not TWO_CORES, reason="core sets need two cores")
def test_overlapping_shares_are_not_slower_than_capped_ones():
    from experiments.bench.shares import measure

    res = measure("tiny", [(100, 100), (100, 50), (50, 100)], rounds=2, requests=24, concurrency=8)
    tps = {tuple(r["partition"]): r["tokens_per_s"] for r in res["summary"]}
    # (100, 100) used to run ~10x slower: both workers' thread pools on the same two cores
    assert tps[(100, 100)] >= 0.85 * max(tps[(100, 50)], tps[(50, 100)]), tps


def test_unavailable_share_backend_falls_back_to_uncapped(llama_checkpoint, caplog):
    engine = make_engine(model_cfg(llama_checkpoint), engine_cfg(name="semipd", partition_backend="green_context",
                                                                    prefill_share=50, decode_share=50))
    shares = engine.partition_control
    assert shares.backend == "none" and shares.describe()["prefill_share"] == 100
    assert "running uncapped" in caplog.text
    with pytest.raises(ValueError):
        shares.set_partition(shares.partition)


def test_an_mps_share_switch_hands_running_requests_to_a_standby(llama_checkpoint, monkeypatch):
    """MPS fixes a client's share when it starts: a switch starts a standby with the new percentage, and it takes
    over at the old worker's iteration boundary. Under a stream of requests nothing is failed, lost or duplicated
    (every output is transformers' greedy one, no block leaks), both phases switch independently, and a share asked
    for while a standby starts is applied by the next one. The MPS daemon is not needed for the protocol: on a CPU
    the percentage is only an environment variable the workers report."""
    import semipd_engine.process.engine_client as ec
    from semipd_engine.core.messages import ShareSwitched
    from semipd_engine.core.request import Request, SamplingParams
    from semipd_engine.shares.partition import Partition

    monkeypatch.setattr(ec, "resolve_backend", lambda name, device: "mps")
    engine = make_engine(model_cfg(llama_checkpoint), engine_cfg(name="semipd", num_kv_blocks=128, block_size=4,
                                                                    prefill_share=50, decode_share=50))
    ps = prompts(engine_vocab(llama_checkpoint), seed=7)
    expected = [hf_greedy(llama_checkpoint, p, 24) for p in ps]
    switched = []

    class Events:
        def observe_iteration(self, worker, stats):
            pass

        def observe_event(self, event):
            if isinstance(event, ShareSwitched):
                switched.append((event.worker, event.share))
                print(f"{event.worker} -> {event.share}: stall {1e3 * event.stall_s:.1f} ms, "
                      f"{event.delay_s:.2f} s after it was asked for")

    engine.subscribe(Events())

    async def one(i: int):
        s = engine.add(Request(f"m{i}", ps[i % len(ps)], SamplingParams(max_tokens=24, temperature=0.0,
                                                                        ignore_eos=True)))
        toks = []
        while True:
            o = await asyncio.wait_for(s.get(), 120)
            assert o.error is None, o.error
            toks += o.new_token_ids
            if o.finished:
                return i, toks

    async def main():
        await engine.start(120)
        try:
            old = {w: engine.worker_info[w]["pid"] for w in ("prefill", "decode")}
            assert engine.worker_info["decode"]["mps_active_thread_percentage"] == 50
            tasks = [asyncio.create_task(one(i)) for i in range(4)]
            await asyncio.sleep(0.2)
            engine.partition_control.set_partition(Partition(70, 30))
            await asyncio.sleep(0.3)
            engine.partition_control.set_partition(Partition(70, 100))  # decode again, while its standby starts
            i = len(tasks)
            deadline = time.monotonic() + 90
            while len(switched) < 3 and time.monotonic() < deadline:  # load all along the switches
                tasks.append(asyncio.create_task(one(i)))
                i += 1
                await asyncio.sleep(0.05)
            results = await asyncio.gather(*tasks)
            assert sorted(switched) == [("decode", 30), ("decode", 100), ("prefill", 70)], switched
            for i, toks in results:
                assert toks == expected[i % len(ps)], i
            info = engine.worker_info
            assert info["prefill"]["mps_active_thread_percentage"] == 70
            assert "mps_active_thread_percentage" not in info["decode"]  # 100: uncapped, no variable
            assert info["prefill"]["pid"] != old["prefill"] and info["decode"]["pid"] != old["decode"]
            assert engine.partition_control.describe()["decode_share"] == 100 and engine.restarts == 0
            await asyncio.sleep(0.3)
            assert engine.states["shared"].pool.num_used == 0
            assert not engine._standbys and not alive(list(old.values()))
        finally:
            await engine.shutdown()

    asyncio.run(main())


def _no_standby_at_30(executor):
    """An executor wrapper (importable: workers are spawned) under which a worker capped at 30 % cannot start."""
    if os.environ.get("CUDA_MPS_ACTIVE_THREAD_PERCENTAGE") == "30":
        raise RuntimeError("this standby cannot start")
    return executor


def test_a_standby_that_cannot_start_leaves_the_worker_and_its_share(llama_checkpoint, monkeypatch):
    import semipd_engine.process.engine_client as ec
    from semipd_engine.process.engine_client import EngineClient
    from semipd_engine.shares.partition import Partition

    monkeypatch.setattr(ec, "resolve_backend", lambda name, device: "mps")
    engine = EngineClient(model_cfg(llama_checkpoint), engine_cfg(name="semipd", num_kv_blocks=128, block_size=4,
                                                                    prefill_share=50, decode_share=50),
                          executor_wrapper=_no_standby_at_30)
    ps = prompts(engine_vocab(llama_checkpoint), seed=9)[:3]
    expected = [hf_greedy(llama_checkpoint, p, 16) for p in ps]

    async def main():
        await engine.start(120)
        try:
            decode_pid = engine.worker_info["decode"]["pid"]
            engine.partition_control.set_partition(Partition(50, 30))
            deadline = time.monotonic() + 60
            while engine._standbys and time.monotonic() < deadline:
                await asyncio.sleep(0.1)
            assert not engine._standbys
            assert engine.partition_control.describe()["decode_share"] == 50  # what runs, not what was asked
            assert engine.worker_info["decode"]["pid"] == decode_pid and engine.restarts == 0
            assert await stream_greedy(engine, ps, 16) == expected
        finally:
            await engine.shutdown()

    asyncio.run(main())
