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

from semipd_engine.engine import SemiPDEngine
from semipd_engine.kv_cache import SharedBlockPool
from tests.helpers import engine_cfg, engine_vocab, generate_through, hf_greedy, model_cfg, prompts
from tests.helpers.server import ServerProcess, metric

TWO_CORES = len(os.sched_getaffinity(0)) >= 2


@pytest.mark.parametrize("num_kv_blocks", [256, 20], ids=["roomy", "preempting"])
def test_greedy_matches_transformers_with_one_shared_pool(llama_checkpoint, num_kv_blocks):
    ecfg = engine_cfg(name="semipd", policy="chunked", num_kv_blocks=num_kv_blocks, block_size=4,
                      max_num_batched_tokens=32, prefill_share=50, decode_share=50)
    engine = SemiPDEngine(model_cfg(llama_checkpoint), ecfg)
    ps = prompts(engine_vocab(llama_checkpoint))
    outs = asyncio.run(generate_through(engine, ps, 24))
    for p, o in zip(ps, outs):
        assert o == hf_greedy(llama_checkpoint, p, 24)
    # The owner never runs the model: KV bytes in its tensor were written in place by the workers,
    # and its allocator saw every allocation and free of both workers.
    assert engine.shared.kv.data.abs().sum() > 0
    assert engine.shared.pool.num_used == 0
    info = engine.worker_info
    assert info["prefill"]["pid"] != info["decode"]["pid"]
    if TWO_CORES:
        assert tuple(info["prefill"]["cores"]) == (0,) and tuple(info["decode"]["cores"]) == (1,)


def _hammer(pool, owner, seed, iters, errors):
    import random

    rng = random.Random(seed)
    held: list[list[int]] = []
    try:
        for _ in range(iters):
            if held and (rng.random() < 0.5 or pool.num_free < 4):
                blocks = held.pop(rng.randrange(len(held)))
                for b in blocks:
                    owner[b] = -1
                pool.free(blocks)
            else:
                got = pool.try_allocate(rng.randint(1, 4))
                if got is None:
                    continue
                for b in got:
                    if owner[b] != -1:
                        errors[0] += 1  # handed out while another process held it
                    owner[b] = seed
                held.append(got)
        for blocks in held:
            for b in blocks:
                owner[b] = -1
            pool.free(blocks)
    except Exception:
        errors[1] += 1
        raise


def test_allocator_is_atomic_across_processes():
    import torch.multiprocessing as tmp

    ctx = tmp.get_context("spawn")
    pool = SharedBlockPool(64, 4, 0.0, ctx.Lock())
    owner = torch.full((64,), -1, dtype=torch.int64).share_memory_()
    errors = torch.zeros(2, dtype=torch.int64).share_memory_()
    procs = [ctx.Process(target=_hammer, args=(pool, owner, s, 3000, errors)) for s in (1, 2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
    assert all(p.exitcode == 0 for p in procs)
    assert errors.tolist() == [0, 0], "double allocation or allocator error"
    assert pool.num_free == 64 and not bool(pool._used_t.any())


@pytest.fixture(scope="module")
def semipd_server(llama_checkpoint):
    srv = ServerProcess("engine=semipd", "model=hf", f"model.path={llama_checkpoint}", "engine.kv_cache_mb=8",
                        "engine.block_size=4")
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


def test_dead_worker_fails_requests_and_health(llama_checkpoint):
    import http.client

    srv = ServerProcess("engine=semipd", "model=hf", f"model.path={llama_checkpoint}", "engine.kv_cache_mb=8")
    try:
        from .test_server import _children

        kids = [p for p in _children(srv.proc.pid) if "spawn_main" in open(f"/proc/{p}/cmdline").read()]
        conn = http.client.HTTPConnection("127.0.0.1", srv.port, timeout=30)
        conn.request("POST", "/v1/completions", json.dumps({"prompt": [5, 6, 7], "max_tokens": 500, "stream": True,
                                                             "ignore_eos": True}), {"Content-Type": "application/json"})
        resp = conn.getresponse()
        assert resp.status == 200
        first = resp.readline()  # the stream has started: the request is in the workers
        assert first.startswith(b"data:")
        for k in kids:  # both phase workers
            os.kill(k, 9)
        rest = resp.read().decode()  # must end, not hang
        assert '"error"' in rest and "[DONE]" in rest
        try:
            urllib.request.urlopen(srv.url + "/health")
            raise AssertionError("health should fail")
        except urllib.error.HTTPError as e:
            assert e.code == 503
        status, body = _post(srv.url + "/v1/completions", {"prompt": [5, 6], "max_tokens": 3})
        assert status == 503 and "worker" in body["error"]["message"]
    finally:
        srv.stop()


def test_unavailable_share_backend_falls_back_to_uncapped(llama_checkpoint, caplog):
    engine = SemiPDEngine(model_cfg(llama_checkpoint), engine_cfg(name="semipd", partition_backend="green_context",
                                                                    prefill_share=50, decode_share=50))
    assert engine.backend == "none" and engine.describe()["prefill_share"] == 100
    assert "running uncapped" in caplog.text
    with pytest.raises(ValueError):
        engine.set_partition(engine.partition)
