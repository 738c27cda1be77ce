"""The OpenAI-compatible server: shapes, the openai SDK, bad input, aborts, shutdown."""

from __future__ import annotations

import json
import os
import socket
import time
import urllib.error
import urllib.request

import pytest

from tests.helpers.server import ServerProcess, metric


@pytest.fixture(scope="module")
def server():
    srv = ServerProcess("engine=unified", "model=tiny", "engine.kv_cache_mb=32")
    yield srv
    srv.stop()


def post(url, body, raw: bytes | None = None):
    data = raw if raw is not None else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def wait_blocks_free(url, timeout=10.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if metric(url, "kv_blocks_used") == 0 and metric(url, "requests_running") == 0:
            return True
        time.sleep(0.1)
    return False


def test_health_models_metrics(server):
    with urllib.request.urlopen(server.url + "/v1/models") as r:
        models = json.loads(r.read())
    assert models["data"][0]["id"] == "tiny"
    assert metric(server.url, "kv_blocks_total") > 0


def test_completion_usage_and_greedy_determinism(server):
    body = {"prompt": "The quick brown fox", "max_tokens": 12, "temperature": 0, "ignore_eos": True}
    s1, r1 = post(server.url + "/v1/completions", body)
    s2, r2 = post(server.url + "/v1/completions", {**body, "prompt": r1["choices"][0]["text"][:0] + body["prompt"]})
    assert s1 == s2 == 200
    assert r1["choices"][0]["text"] == r2["choices"][0]["text"]
    assert r1["usage"]["completion_tokens"] == 12 and r1["choices"][0]["finish_reason"] == "length"


def test_seeded_sampling_is_reproducible(server):
    body = {"prompt": [5, 6, 7, 8], "max_tokens": 10, "temperature": 1.0, "top_p": 0.9, "top_k": 50, "seed": 7,
            "ignore_eos": True}
    a = post(server.url + "/v1/completions", body)[1]["choices"][0]["text"]
    b = post(server.url + "/v1/completions", body)[1]["choices"][0]["text"]
    assert a == b


def test_openai_sdk_streaming(server):
    openai = pytest.importorskip("openai")
    client = openai.OpenAI(base_url=server.url + "/v1", api_key="none")
    full = client.completions.create(model="tiny", prompt="Hello world", max_tokens=16, temperature=0,
                                     extra_body={"ignore_eos": True})
    chunks = list(client.completions.create(model="tiny", prompt="Hello world", max_tokens=16, temperature=0,
                                            stream=True, stream_options={"include_usage": True},
                                            extra_body={"ignore_eos": True}))
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    assert text == full.choices[0].text
    assert chunks[-1].usage.completion_tokens == 16
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    chat = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}], max_tokens=5)
    assert chat.choices[0].message.role == "assistant"


def test_stop_string_cuts_output(server):
    body = {"prompt": "Once upon", "max_tokens": 20, "temperature": 0, "ignore_eos": True}
    text = post(server.url + "/v1/completions", body)[1]["choices"][0]["text"]
    stop = text[5:8]
    assert stop
    r = post(server.url + "/v1/completions", {**body, "stop": [stop]})[1]
    assert r["choices"][0]["text"] == text[: text.index(stop)]
    assert r["choices"][0]["finish_reason"] == "stop"


BAD = [
    ({"prompt": ""}, "prompt"),
    ({}, "prompt"),
    ({"prompt": 12}, "prompt"),
    ({"prompt": [1, "a"]}, "prompt"),
    ({"prompt": [1, 10**9]}, "prompt"),
    ({"prompt": "hi", "max_tokens": 0}, "max_tokens"),
    ({"prompt": "hi", "max_tokens": -3}, "max_tokens"),
    ({"prompt": "hi", "max_tokens": "5"}, "max_tokens"),
    ({"prompt": "hi", "max_tokens": 10**7}, "max_tokens"),
    ({"prompt": [1] * 5000, "max_tokens": 1}, "prompt"),
    ({"prompt": "hi", "temperature": -1}, "temperature"),
    ({"prompt": "hi", "temperature": "hot"}, "temperature"),
    ({"prompt": "hi", "top_p": 0}, "top_p"),
    ({"prompt": "hi", "top_p": 1.5}, "top_p"),
    ({"prompt": "hi", "top_k": 0}, "top_k"),
    ({"prompt": "hi", "seed": 1.5}, "seed"),
    ({"prompt": "hi", "stop": [3]}, "stop"),
    ({"prompt": "hi", "stream": "yes"}, "stream"),
    ({"prompt": "hi", "n": 2}, "n"),
]


@pytest.mark.parametrize("body,param", BAD, ids=[p + str(i) for i, (_, p) in enumerate(BAD)])
def test_bad_input_is_400_naming_the_field(server, body, param):
    status, resp = post(server.url + "/v1/completions", body)
    assert status == 400, resp
    assert resp["error"]["param"] == param and resp["error"]["type"] == "invalid_request_error"
    assert resp["error"]["message"]


def test_malformed_json_and_unknown_model(server):
    status, resp = post(server.url + "/v1/completions", None, raw=b"{not json")
    assert status == 400 and "JSON" in resp["error"]["message"]
    status, resp = post(server.url + "/v1/completions", None, raw=b"[1, 2]")
    assert status == 400
    status, resp = post(server.url + "/v1/completions", {"model": "gpt-9", "prompt": "x"})
    assert status == 404 and resp["error"]["code"] == "model_not_found"
    status, resp = post(server.url + "/v1/chat/completions", {"messages": "hi"})
    assert status == 400 and resp["error"]["param"] == "messages"
    assert wait_blocks_free(server.url)


def test_client_disconnect_mid_stream_frees_blocks(server):
    body = json.dumps({"prompt": "A long story", "max_tokens": 3000, "stream": True, "ignore_eos": True}).encode()
    s = socket.create_connection(("127.0.0.1", server.port))
    s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
              + f"Content-Length: {len(body)}\r\n\r\n".encode() + body)
    got = b""
    while got.count(b"data:") < 3:
        got += s.recv(4096)
    assert metric(server.url, "kv_blocks_used") > 0
    s.close()
    assert wait_blocks_free(server.url), "aborted request kept its KV blocks"


def test_sigterm_exits_cleanly_and_stops_workers():
    srv = ServerProcess("engine=unified_chunked", "model=tiny", "engine.kv_cache_mb=16", "server.drain_timeout_s=1")
    with urllib.request.urlopen(srv.url + "/metrics") as r:
        assert r.status == 200
    children = _children(srv.proc.pid)
    assert children, "the engine worker should be a child process"
    assert srv.stop() == 0
    deadline = time.monotonic() + 10
    while _alive(children) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not _alive(children), "engine processes left running after SIGTERM"


def _alive(pids: list[int]) -> list[int]:
    out = []
    for p in pids:
        try:
            with open(f"/proc/{p}/stat") as f:
                if f.read().split()[2] != "Z":
                    out.append(p)
        except FileNotFoundError:
            pass
    return out


def _children(pid: int) -> list[int]:
    out = []
    for task in os.listdir(f"/proc/{pid}/task"):
        with open(f"/proc/{pid}/task/{task}/children") as f:
            out += [int(x) for x in f.read().split()]
    return out


def test_crashed_worker_fails_requests_and_health():
    srv = ServerProcess("engine=unified", "model=tiny", "engine.kv_cache_mb=16")
    try:
        worker = _children(srv.proc.pid)
        worker = [p for p in worker if "spawn_main" in open(f"/proc/{p}/cmdline").read()]
        import threading

        result = {}

        def long_request():
            result["resp"] = post(srv.url + "/v1/completions",
                                  {"prompt": "x", "max_tokens": 3000, "ignore_eos": True})

        t = threading.Thread(target=long_request)
        t.start()
        time.sleep(1.0)
        os.kill(worker[0], 9)
        t.join(30)
        assert not t.is_alive(), "request hung after the worker died"
        status, body = result["resp"]
        assert status == 500 and "worker" in body["error"]["message"]
        try:
            urllib.request.urlopen(srv.url + "/health")
            raise AssertionError("health should fail")
        except urllib.error.HTTPError as e:
            assert e.code == 503
        status, body = post(srv.url + "/v1/completions", {"prompt": "x"})
        assert status == 503
    finally:
        srv.stop()
