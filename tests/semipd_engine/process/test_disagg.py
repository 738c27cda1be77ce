"""The disaggregated baseline: own weights and pools per instance, real KV transfer, back-pressure."""

from __future__ import annotations

import asyncio
import json
import socket
import time

import pytest
import torch

from semipd_engine.core.block_pool import BlockPool
from semipd_engine.core.kv_transfer import TensorBlockCopy, TransferQueue
from semipd_engine.core.request import Request, SamplingParams
from semipd_engine.model.spec import ModelSpec
from semipd_engine.process.engine_client import make_engine
from semipd_engine.runtime.kv_cache import KVCache
from semipd_engine.shares.partition import unit_cores
from tests.helpers import engine_cfg, engine_vocab, generate_through, hf_greedy, model_cfg, prompts
from tests.helpers.server import ServerProcess, metric

SPEC = ModelSpec("llama", 100, 32, 64, 2, 4, 2, 8, 1e-6, 1e4, 128, False, False)


def test_transferred_blocks_are_bit_identical_and_backpressure_waits():
    src = KVCache(SPEC, 16, 4, torch.float32)
    src.data.copy_(torch.randn_like(src.data))
    dst = KVCache(SPEC, 6, 4, torch.float32)
    pool = BlockPool(6, 4)
    rx = TransferQueue(pool, TensorBlockCopy({"prefill0": src}, dst))
    reqs = []
    for i, blocks in enumerate(([3, 7, 1], [9, 2], [11, 12, 13])):
        r = Request(f"r{i}", list(range(1, 4 * len(blocks) + 1)), SamplingParams())
        r.block_table = list(blocks)
        reqs.append(r)
        rx.offer(r, "prefill0")
    done = rx.pull()
    assert [t.request.request_id for t, *_ in done] == ["r0", "r1"]  # r2 needs 3 blocks, 1 is free
    assert len(rx.pending) == 1 and pool.num_free == 1
    for t, nbytes, *_ in done:
        assert nbytes == len(t.src_blocks) * src.data[:, :, 0].numel() * 4
        for s, d in zip(t.src_blocks, t.request.block_table):
            assert torch.equal(src.data[:, :, s], dst.data[:, :, d])
    pool.free(reqs[0].block_table)  # r0 finished decoding
    (t, *_), = rx.pull()
    assert t.request.request_id == "r2"
    assert all(torch.equal(src.data[:, :, s], dst.data[:, :, d]) for s, d in zip(t.src_blocks, t.request.block_table))


def test_instance_core_sets():
    assert unit_cores(2, (0, 1)) == [(0,), (1,)]
    assert unit_cores(4, (0, 1, 2, 3, 4, 5, 6, 7)) == [(0, 1), (2, 3), (4, 5), (6, 7)]
    assert unit_cores(3, (0, 1)) == [(0,), (1,), (0,)]


@pytest.mark.parametrize("num_kv_blocks", [512, 40], ids=["roomy", "tight-decode-pool"])
def test_greedy_matches_transformers(llama_checkpoint, num_kv_blocks):
    ecfg = engine_cfg(name="disagg", num_kv_blocks=num_kv_blocks, block_size=4,
                      max_num_batched_tokens=32)
    engine = make_engine(model_cfg(llama_checkpoint), ecfg)
    ps = prompts(engine_vocab(llama_checkpoint))
    outs = asyncio.run(generate_through(engine, ps, 24))
    for p, o in zip(ps, outs):
        assert o == hf_greedy(llama_checkpoint, p, 24)
    info = engine.worker_info
    assert info["prefill0"]["pid"] != info["decode0"]["pid"]
    assert info["prefill0"]["kv_blocks_total"] + info["decode0"]["kv_blocks_total"] == num_kv_blocks


def test_no_leaks_after_mixed_aborted_and_preempted_requests(llama_checkpoint):
    srv = ServerProcess("engine=disagg", "model=hf", f"model.path={llama_checkpoint}", "engine.num_kv_blocks=60",
                        "engine.block_size=4", "engine.max_num_batched_tokens=64")
    try:
        import threading
        import urllib.request

        completed: list[int] = []

        def complete(i):
            body = json.dumps({"prompt": [5 + i] * (10 + 3 * i), "max_tokens": 40, "ignore_eos": True}).encode()
            req = urllib.request.Request(srv.url + "/v1/completions", data=body,
                                         headers={"Content-Type": "application/json"})
            with urllib.request.urlopen(req, timeout=120) as r:
                completed.append(json.loads(r.read())["usage"]["completion_tokens"])

        def abandon(i):
            body = json.dumps({"prompt": [7] * 20, "max_tokens": 100, "stream": True, "ignore_eos": True}).encode()
            s = socket.create_connection(("127.0.0.1", srv.port))
            s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                      + f"Content-Length: {len(body)}\r\n\r\n".encode() + body)
            s.recv(1024)
            time.sleep(0.05 * i)
            s.close()

        threads = [threading.Thread(target=complete, args=(i,)) for i in range(8)]
        threads += [threading.Thread(target=abandon, args=(i,)) for i in range(6)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(180)
        assert completed == [40] * 8, completed
        deadline = time.monotonic() + 10
        while metric(srv.url, "kv_blocks_used") and time.monotonic() < deadline:
            time.sleep(0.1)
        assert metric(srv.url, "kv_blocks_used") == 0, "a pool kept blocks"
        assert metric(srv.url, "kv_transfer_bytes_total") > 0
        assert metric(srv.url, "preemptions_total") > 0, "the small decode pool should have preempted"
    finally:
        srv.stop()
