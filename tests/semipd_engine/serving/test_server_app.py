"""The HTTP layer in process (a fake engine, no worker processes): every error is OpenAI-style JSON, hostile
bodies are 4xx, big prompts never stall the event loop, disconnects are counted, the API key guards."""

from __future__ import annotations

import asyncio
import json
import logging
import time

import pytest
from aiohttp.test_utils import TestClient, TestServer

from semipd_engine.serving.server import ApiServer, is_loopback
from semipd_engine.serving.tokenizer import builtin_tokenizer
from semipd_engine.shares.partition import Partition
from tests.helpers.fake_engine import FakeEngine, body_error


class PartitionedFake(FakeEngine):
    """A fake engine with the partition-control capability."""

    def __init__(self, **kw):
        super().__init__(name="semipd", **kw)
        self.partition = Partition(50, 50)

    @property
    def partition_control(self):
        return self

    def describe(self) -> dict:
        return {"prefill_share": self.partition.prefill_share, "decode_share": self.partition.decode_share}

    def set_partition(self, p: Partition) -> dict:
        self.partition = p
        return self.describe()


def run(test, engine=None, api_cls=ApiServer, **api_kw):
    """Run `await test(client, api)` against an in-process server."""
    engine = engine or FakeEngine()
    tok = builtin_tokenizer()

    async def main():
        api = api_cls(engine, tok, len(tok), "tiny", **api_kw)
        await engine.start(1)
        async with TestClient(TestServer(api.app())) as client:
            try:
                return await test(client, api)
            finally:
                await engine.shutdown()
                api.close()

    return asyncio.run(main())


async def _json(resp):
    return resp.status, json.loads(await resp.read())


def test_routing_errors_are_openai_json():
    async def test(client, api):
        status, body = await _json(await client.get("/v1/nothing"))
        assert status == 404 and body_error(body)["code"] == "not_found"
        resp = await client.get("/v1/completions")
        status, body = await _json(resp)
        assert status == 405 and "POST" in body_error(body)["message"] and "POST" in resp.headers["Allow"]
        status, body = await _json(await client.post("/v1/completions", data=b"x" * (64 * 2**20 + 1)))
        assert status == 413 and body_error(body)["code"] == "request_too_large"

    run(test)


def _nested(depth: int):
    x = [1]
    for _ in range(depth - 1):
        x = [x]
    return x


BOTH, COMPLETIONS, CHAT = ("/v1/completions", "/v1/chat/completions"), ("/v1/completions",), ("/v1/chat/completions",)
HOSTILE = [
    # (raw body, content type, the param the error names (or None), a fragment of its message, paths)
    (b"[" * 100000 + b"]" * 100000, "application/json", None, "deeper", BOTH),
    (json.dumps({"prompt": "x", "extra": _nested(70)}).encode(), "application/json", None, "deeper", BOTH),
    (b'{"prompt": "a\\ud800b"}', "application/json", "prompt", "surrogate", COMPLETIONS),
    (b'{"messages": [{"role": "user", "content": "a\\udfffb"}]}', "application/json", "messages[0].content",
     "surrogate", CHAT),
    (b'{"prompt": "hi", "stop": ["\\ud800"]}', "application/json", "stop", "surrogate", COMPLETIONS),
    (b'{"prompt": "hi"}', "application/json; charset=bogus", None, "charset", BOTH),
    (b'{"prompt": "\xff\xfe"}', "application/json", None, "utf-8", BOTH),
    (b'{"prompt": "hi", "temperature": NaN}', "application/json", "temperature", "temperature", COMPLETIONS),
    (b'{"prompt": "hi", "max_tokens": 1' + b"0" * 5000 + b"}", "application/json", None, "JSON", BOTH),
    (b'{"prompt": "hello", "max_tokens": 4, "temperature": 1, "seed": 18446744073709551616}', "application/json",
     "seed", "seed", COMPLETIONS),
    (b'{"prompt": "hello", "max_tokens": 4, "temperature": 1, "seed": -9223372036854775809}', "application/json",
     "seed", "seed", COMPLETIONS),
    (b"", "application/json", None, "JSON", BOTH),
]


@pytest.mark.parametrize("raw,ctype,param,fragment,paths", HOSTILE, ids=[f"hostile{i}" for i in range(len(HOSTILE))])
def test_hostile_bodies_are_400_json_and_the_server_stays_up(raw, ctype, param, fragment, paths):
    async def test(client, api):
        for path in paths:
            status, body = await _json(await client.post(path, data=raw, headers={"Content-Type": ctype}))
            err = body_error(body)
            assert status == 400, body
            assert fragment.lower() in err["message"].lower(), err
            assert err["param"] == param
        status, body = await _json(await client.get("/health"))
        assert status == 200 and body["status"] == "ok"

    run(test)


def test_tiny_temperatures_are_greedy_answers_not_errors():
    async def test(client, api):
        for t in (1e-40, 1e-38, 5e-324):
            status, body = await _json(await client.post("/v1/completions", json={
                "prompt": "hello", "max_tokens": 4, "temperature": t}))
            assert status == 200 and body["usage"]["completion_tokens"] == 4
        req = next(iter(api.engine.requests.values()))
        assert req.params.temperature == 0.0 and req.params.greedy

    run(test)


def test_a_10mb_prompt_is_refused_before_tokenizing_and_health_never_stalls():
    async def test(client, api):
        stalls = []

        async def probe():
            while True:
                t0 = time.monotonic()
                assert (await client.get("/health")).status == 200
                stalls.append(time.monotonic() - t0)
                await asyncio.sleep(0.01)

        task = asyncio.create_task(probe())
        t0 = time.monotonic()
        status, body = await _json(await client.post("/v1/completions", json={"prompt": "hello world " * 900_000}))
        took = time.monotonic() - t0
        task.cancel()
        assert status == 400 and body_error(body)["code"] == "context_length_exceeded" and body["error"]["param"]
        assert took < 2.0
        assert max(stalls) < 0.5

    run(test, FakeEngine(max_model_len=256))


def test_a_long_prompt_that_may_fit_is_tokenized_off_the_event_loop():
    async def test(client, api):
        stalls = []
        done = asyncio.Event()

        async def probe():
            while not done.is_set():
                t0 = time.monotonic()
                assert (await client.get("/health")).status == 200
                stalls.append(time.monotonic() - t0)
                await asyncio.sleep(0.005)

        task = asyncio.create_task(probe())
        # ~300 KB of text: too many tokens for the context in the end (a 400), but only the tokenizer can tell
        status, body = await _json(await client.post("/v1/completions", json={"prompt": "hello world " * 25_000}))
        done.set()
        await task
        assert status == 400 and body_error(body)["code"] == "context_length_exceeded"
        assert len(stalls) >= 3, "the event loop was blocked while tokenizing"
        assert max(stalls) < 0.25

    run(test, FakeEngine(max_model_len=4000))


class DropOnFinalChunk(ApiServer):
    """The client is gone exactly when the final chunk (the one with finish_reason) is written."""

    async def _send_event(self, resp, obj):
        if obj.get("choices") and obj["choices"][0].get("finish_reason"):
            raise ConnectionResetError("Cannot write to closing transport")
        await super()._send_event(resp, obj)


def test_a_disconnect_on_the_last_chunk_is_counted_as_an_abort(tmp_path, caplog):
    log_path = tmp_path / "requests.jsonl"

    async def test(client, api):
        resp = await client.post("/v1/completions", json={"prompt": "hi", "max_tokens": 3, "stream": True})
        await resp.read()
        await asyncio.sleep(0.05)
        text = api.metrics.render().decode()
        assert 'request_success_total{finish_reason="abort"} 1.0' in text
        assert 'finish_reason="length"' not in text

    with caplog.at_level(logging.INFO):
        run(test, api_cls=DropOnFinalChunk, request_log=str(log_path))
    rows = [json.loads(line) for line in log_path.read_text().splitlines()]
    assert len(rows) == 1 and rows[0]["finish_reason"] == "abort" and rows[0]["output_tokens"] == 3
    assert any("client went away" in r.message and r.levelno == logging.INFO for r in caplog.records)
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR], "a disconnect is not an error"


def test_every_request_is_counted_once_whatever_happens(tmp_path):
    log_path = tmp_path / "requests.jsonl"

    async def test(client, api):
        ok = await client.post("/v1/completions", json={"prompt": "hi", "max_tokens": 3})
        assert ok.status == 200
        stream = await client.post("/v1/completions", json={"prompt": "hi", "max_tokens": 3, "stream": True})
        assert (await stream.read()).endswith(b"data: [DONE]\n\n")
        # a client that leaves mid-stream: the handler is cancelled while it waits for tokens
        api.engine.delay_s = 0.05
        resp = await client.post("/v1/completions", json={"prompt": "hi", "max_tokens": 50, "stream": True})
        await resp.content.readline()
        resp.close()
        for _ in range(100):
            if api.engine.aborted:
                break
            await asyncio.sleep(0.02)
        assert len(api.engine.aborted) == 1

    run(test, request_log=str(log_path))
    reasons = [json.loads(line)["finish_reason"] for line in log_path.read_text().splitlines()]
    assert sorted(reasons) == ["abort", "length", "length"]


def test_health_names_the_configured_engine_and_reports_restarts():
    async def test(client, api):
        status, body = await _json(await client.get("/health"))
        assert status == 200 and body["engine"] == "unified_chunked" and body["restarts"] == 0
        api.engine.fail("worker unified (pid 1) exited with code -9", state="restarting")
        status, body = await _json(await client.get("/health"))
        assert status == 503 and body["status"] == "restarting" and "exited" in body["reason"]
        status, body = await _json(await client.post("/v1/completions", json={"prompt": "hi"}))
        assert status == 503 and "restarting" in body_error(body)["message"]

    run(test)


def test_engine_failure_is_a_500_json_error():
    class Failing(FakeEngine):
        async def _run(self, req, q):
            from semipd_engine.core.request import RequestOutput

            q.put_nowait(RequestOutput(req.request_id, (), (), True, "error", 0, 0, error="worker x crashed"))

    async def test(client, api):
        status, body = await _json(await client.post("/v1/completions", json={"prompt": "hi"}))
        assert status == 500 and body_error(body)["type"] == "server_error" and "crashed" in body["error"]["message"]

    run(test, Failing())


def test_unexpected_exceptions_are_a_500_json_error():
    class Broken(ApiServer):
        async def models(self, request):
            raise RuntimeError("boom")

    async def test(client, api):
        status, body = await _json(await client.get("/v1/models"))
        assert status == 500 and body_error(body)["type"] == "server_error" and "boom" not in body["error"]["message"]

    run(test, api_cls=Broken)


def test_api_key_guards_every_endpoint_but_health_and_metrics():
    async def test(client, api):
        for method, path in [("GET", "/v1/models"), ("POST", "/v1/completions"), ("GET", "/partition"),
                             ("POST", "/partition"), ("GET", "/nothing")]:
            for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "secret"}):
                resp = await client.request(method, path, headers=headers, json={"prompt": "hi"})
                status, body = await _json(resp)
                assert status == 401 and body_error(body)["code"] == "invalid_api_key", (method, path, headers)
        auth = {"Authorization": "Bearer secret"}
        assert (await client.get("/v1/models", headers=auth)).status == 200
        resp = await client.post("/v1/completions", headers=auth, json={"prompt": "hi", "max_tokens": 2})
        assert resp.status == 200
        assert (await client.get("/health")).status == 200 and (await client.get("/metrics")).status == 200

    run(test, PartitionedFake(), api_key="secret")


def test_partition_endpoint_takes_only_json():
    async def test(client, api):
        # what a cross-site form or fetch() without a preflight can send
        for ctype in ("text/plain", "application/x-www-form-urlencoded", "multipart/form-data; boundary=x", None):
            headers = {"Content-Type": ctype} if ctype else {}
            status, body = await _json(await client.post("/partition", data=b'{"prefill_share": 100}',
                                                         headers=headers))
            assert status == 415 and body_error(body)["code"] == "unsupported_media_type"
        assert api.engine.partition == Partition(50, 50)
        status, body = await _json(await client.post("/partition", json={"prefill_share": 100}))
        assert status == 200 and body["prefill_share"] == 100
        status, body = await _json(await client.post("/partition", data=b"[" * 5000,
                                                     headers={"Content-Type": "application/json"}))
        assert status == 400 and "deeper" in body_error(body)["message"]

    run(test, PartitionedFake())


def test_loopback_detection():
    assert is_loopback("127.0.0.1") and is_loopback("::1") and is_loopback("localhost") and is_loopback("127.0.0.2")
    assert not is_loopback("0.0.0.0") and not is_loopback("::") and not is_loopback("") \
        and not is_loopback("example.org") and not is_loopback("10.0.0.1")


# What guidellm sends (chat with content parts; completions), with the keys it adds to every request.
GUIDELLM_CHAT = {"model": "tiny", "messages": [{"role": "user", "content": [{"type": "text", "text": "hello there"}]}],
                 "max_tokens": 5, "max_completion_tokens": 5, "stop": None, "ignore_eos": True, "stream": True,
                 "stream_options": {"include_usage": True}}
GUIDELLM_COMPLETIONS = {"model": "tiny", "prompt": "hello there", "max_tokens": 5, "stop": None, "ignore_eos": True,
                        "stream": True, "stream_options": {"include_usage": True}}


@pytest.mark.parametrize("path,body", [("/v1/chat/completions", GUIDELLM_CHAT),
                                       ("/v1/completions", GUIDELLM_COMPLETIONS)], ids=["chat", "completions"])
def test_guidellm_request_shapes_are_served(path, body):
    async def test(client, api):
        resp = await client.post(path, json=body)
        text = (await resp.read()).decode()
        assert resp.status == 200, text
        assert text.rstrip().endswith("data: [DONE]")
        assert '"completion_tokens": 5' in text

    run(test)


def test_unsupported_parameters_are_refused_by_name_and_every_refusal_is_logged(caplog):
    async def test(client, api):
        for path, extra in (("/v1/completions", {"prompt": "hi", "echo": True}),
                            ("/v1/completions", {"prompt": "hi", "logprobs": 2}),
                            ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "n": 3}),
                            ("/v1/chat/completions", {"messages": [{"role": "bot", "content": "hi"}]})):
            status, body = await _json(await client.post(path, json=extra))
            assert status == 400, body
            assert body_error(body)["param"] in ("echo", "logprobs", "n", "messages[0].role")
        status, _ = await _json(await client.get("/v1/nothing"))
        assert status == 404

    with caplog.at_level(logging.WARNING, logger="semipd_engine.serving.server"):
        run(test)
    rejected = [r.getMessage() for r in caplog.records if r.getMessage().startswith("rejected")]
    assert len(rejected) == 5, rejected
    assert "(param echo)" in rejected[0] and "(param messages[0].role)" in rejected[3] and "404" in rejected[4]


def test_unknown_keys_are_tolerated_and_logged_once(caplog):
    async def test(client, api):
        for _ in range(3):
            status, body = await _json(await client.post("/v1/completions", json={
                "prompt": "hi", "max_tokens": 2, "my_benchmark_tag": "x", "top_kk": 5}))
            assert status == 200, body

    with caplog.at_level(logging.WARNING, logger="semipd_engine.serving.server"):
        run(test)
    lines = [r.getMessage() for r in caplog.records if "do not know" in r.getMessage() or "does not know" in
             r.getMessage()]
    assert len(lines) == 1 and "my_benchmark_tag, top_kk" in lines[0], lines
