"""OpenAI-compatible HTTP front end (aiohttp), the same for every engine.

The server tokenizes, validates, streams detokenized text, matches stop
strings, keeps /metrics, and aborts a request whose client goes away. What
runs the model is the `EngineClient` it is given.
"""

from __future__ import annotations

import asyncio
import json
import logging
import signal
import time
import uuid
from typing import Optional

from aiohttp import web

from semipd_engine.detokenizer import IncrementalDetokenizer
from semipd_engine.engine_client import EngineClient, EngineDead
from semipd_engine.metrics import EngineMetrics
from semipd_engine.partition import Partition
from semipd_engine.protocol import ApiError, completion_body, parse_messages, parse_prompt, parse_sampling, usage
from semipd_engine.request import Request, RequestOutput, Timestamps

log = logging.getLogger(__name__)
SSE_HEADERS = {"Content-Type": "text/event-stream", "Cache-Control": "no-cache", "Connection": "keep-alive"}


def error_response(err: ApiError) -> web.Response:
    return web.json_response(err.body(), status=err.status)


class ApiServer:
    def __init__(self, engine: EngineClient, tokenizer, vocab_size: int, model_name: str,
                 request_log: Optional[str] = None):
        self.engine, self.tok, self.vocab_size, self.model_name = engine, tokenizer, vocab_size, model_name
        self.metrics = EngineMetrics()
        self.metrics.pool_label = engine.pool_label
        engine.on_stats = self.metrics.observe_iteration
        engine.on_event = self.metrics.observe_event
        if engine.partition_control is not None:
            self.metrics.add_partition_metrics()
        if engine.controller is not None:
            self.metrics.add_controller_metrics()
        self.draining = False
        self._log_file = open(request_log, "a", buffering=1) if request_log else None
        self.created = int(time.time())

    def app(self) -> web.Application:
        app = web.Application(client_max_size=64 * 2**20)
        app.add_routes([
            web.get("/health", self.health),
            web.get("/v1/models", self.models),
            web.post("/v1/completions", self.completions),
            web.post("/v1/chat/completions", self.chat_completions),
            web.get("/metrics", self.prometheus),
        ])
        if self.engine.partition_control is not None:
            app.add_routes([web.get("/partition", self.get_partition), web.post("/partition", self.post_partition)])
        return app

    # -- semi-PD partition control ---------------------------------------------------------
    async def get_partition(self, request: web.Request) -> web.Response:
        return web.json_response(self.engine.partition_control.describe())

    async def post_partition(self, request: web.Request) -> web.Response:
        control = self.engine.partition_control
        try:
            try:
                body = await request.json()
            except ValueError:
                raise ApiError("request body is not valid JSON") from None
            if not isinstance(body, dict):
                raise ApiError("request body must be a JSON object")
            try:
                p = Partition(body.get("prefill_share", control.partition.prefill_share),
                              body.get("decode_share", control.partition.decode_share))
                return web.json_response(control.set_partition(p))
            except ValueError as e:
                param = "decode_share" if "decode_share" in str(e) else "prefill_share"
                raise ApiError(str(e), param) from None
        except ApiError as e:
            return error_response(e)

    # -- simple endpoints --------------------------------------------------------
    async def health(self, request: web.Request) -> web.Response:
        if self.engine.dead_reason:
            return web.json_response({"status": "error", "reason": self.engine.dead_reason}, status=503)
        if self.draining or not self.engine.ready:
            return web.json_response({"status": "unavailable"}, status=503)
        return web.json_response({"status": "ok", "engine": self.engine.name})

    async def models(self, request: web.Request) -> web.Response:
        if not self.engine.ready:
            return error_response(ApiError("engine is not ready", status=503, type_="server_error"))
        card = {"id": self.model_name, "object": "model", "created": self.created, "owned_by": "semipd-harness",
                "max_model_len": self.engine.max_model_len}
        return web.json_response({"object": "list", "data": [card]})

    async def prometheus(self, request: web.Request) -> web.Response:
        self.metrics.requests_in_flight.set(self.engine.num_in_flight)
        return web.Response(body=self.metrics.render(), content_type="text/plain", charset="utf-8")

    # -- generation ------------------------------------------------------------
    async def completions(self, request: web.Request) -> web.StreamResponse:
        return await self._generate(request, chat=False)

    async def chat_completions(self, request: web.Request) -> web.StreamResponse:
        return await self._generate(request, chat=True)

    async def _generate(self, request: web.Request, chat: bool) -> web.StreamResponse:
        arrival = time.monotonic()
        try:
            req, stream, include_usage = await self._parse(request, chat, arrival)
            out_q = self.engine.add(req)
        except ApiError as e:
            return error_response(e)
        except EngineDead as e:
            return error_response(ApiError(str(e), status=503, type_="server_error"))
        rid, created = req.request_id, int(time.time())
        detok = IncrementalDetokenizer(self.tok, req.params.stop)
        resp: Optional[web.StreamResponse] = None
        done = False
        n_out, finish, error = 0, None, None
        try:
            if stream:
                resp = web.StreamResponse(headers=SSE_HEADERS)
                await resp.prepare(request)
            first = True
            while not done:
                out: RequestOutput = await out_q.get()
                if out.error:
                    error, finish, done = out.error, out.finish_reason, True
                    break
                detok.add(out.new_token_ids)
                n_out = out.num_output_tokens
                self._record_tokens(req, out)
                if detok.stopped:
                    self.engine.abort(rid)
                    finish, done = "stop", True
                elif out.finished:
                    detok.finish()
                    finish, done = out.finish_reason, True
                text = detok.delta(final=done)
                if resp is not None and (text or done):
                    body = completion_body(rid, self.model_name, chat, text, finish if done else None, True,
                                           created, first)
                    first = False
                    await resp.write(f"data: {json.dumps(body)}\n\n".encode())
            self._finish(req, n_out, finish or "error")
            if error:
                err = ApiError(f"request failed in the engine: {error}", status=500, type_="server_error")
                if resp is None:
                    return error_response(err)
                await resp.write(f"data: {json.dumps(err.body())}\n\n".encode())
            if resp is not None:
                if include_usage:
                    tail = completion_body(rid, self.model_name, chat, None, None, True, created)
                    tail["choices"], tail["usage"] = [], usage(req.num_prompt_tokens, n_out)
                    await resp.write(f"data: {json.dumps(tail)}\n\n".encode())
                await resp.write(b"data: [DONE]\n\n")
                await resp.write_eof()
                return resp
            body = completion_body(rid, self.model_name, chat, detok.text, finish, False, created)
            body["usage"] = usage(req.num_prompt_tokens, n_out)
            return web.json_response(body)
        except (ConnectionResetError, asyncio.CancelledError):
            log.info("client went away: aborting %s", rid)
            raise
        finally:
            if not done:
                self.engine.abort(rid)
                self._finish(req, n_out, "abort")

    async def _parse(self, request: web.Request, chat: bool, arrival: float):
        if self.draining:
            raise ApiError("server is shutting down", status=503, type_="server_error")
        if not self.engine.ready:
            raise ApiError(self.engine.dead_reason or "engine is not ready", status=503, type_="server_error")
        try:
            body = await request.json()
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ApiError(f"request body is not valid JSON: {e}") from None
        if not isinstance(body, dict):
            raise ApiError("request body must be a JSON object")
        model = body.get("model")
        if model is not None and model != self.model_name:
            raise ApiError(f"model {model!r} does not exist; this server serves {self.model_name!r}", "model",
                           status=404, code="model_not_found")
        ids = parse_messages(body, self.tok) if chat else parse_prompt(body, self.tok, self.vocab_size)
        params, stream, include_usage = parse_sampling(body, len(ids), self.engine.max_model_len)
        prefix = "chatcmpl" if chat else "cmpl"
        req = Request(f"{prefix}-{uuid.uuid4().hex}", ids, params, times=Timestamps(arrival=arrival))
        return req, stream, include_usage

    def _record_tokens(self, req: Request, out: RequestOutput) -> None:
        if out.token_times and req.times.first_token is None:
            req.times.first_token = out.token_times[0]
        req.times.tokens.extend(out.token_times)
        if out.finished:
            req.times.first_scheduled = out.first_scheduled
            req.times.preemptions = list(out.preemptions)

    def _finish(self, req: Request, n_out: int, reason: str) -> None:
        now = time.monotonic()
        req.times.finished = now
        self.metrics.observe_request(req.times.arrival, req.times.first_token, now, req.num_prompt_tokens, n_out,
                                     reason)
        if reason in ("stop", "length"):
            self.engine.observe_request(req.times.arrival, req.times.first_token, now, n_out)
        if self._log_file:
            t = req.times
            self._log_file.write(json.dumps({
                "request_id": req.request_id, "arrival": t.arrival, "first_scheduled": t.first_scheduled,
                "first_token": t.first_token, "finished": t.finished, "token_times": t.tokens,
                "preemptions": t.preemptions, "prompt_tokens": req.num_prompt_tokens, "output_tokens": n_out,
                "finish_reason": reason,
            }) + "\n")

    async def drain(self, timeout_s: float) -> None:
        """Stop taking requests; give in-flight ones `timeout_s` to finish."""
        self.draining = True
        deadline = time.monotonic() + timeout_s
        while self.engine.num_in_flight and time.monotonic() < deadline:
            await asyncio.sleep(0.05)


async def run_server(engine: EngineClient, tokenizer, vocab_size: int, model_name: str, server_cfg) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    api = ApiServer(engine, tokenizer, vocab_size, model_name, server_cfg.request_log)
    runner = web.AppRunner(api.app(), handler_cancellation=True, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, server_cfg.host, server_cfg.port)
    await site.start()
    # Listening before the engine is ready: /health answers 503 until it is.
    log.info("listening on http://%s:%d; loading engine %s", server_cfg.host, server_cfg.port, engine.name)
    try:
        start = asyncio.create_task(engine.start(server_cfg.startup_timeout_s))
        waiter = asyncio.create_task(stop.wait())
        finished, _ = await asyncio.wait({start, waiter}, return_when=asyncio.FIRST_COMPLETED)
        if start in finished:
            start.result()  # raises if the engine failed to start
            api.metrics.engine_ready(engine.worker_info)
            if engine.partition_control is not None:
                p = engine.partition_control.partition
                api.metrics.partition_prefill_share.set(p.prefill_share)
                api.metrics.partition_decode_share.set(p.decode_share)
            log.info("engine %s ready: %s", engine.name, engine.worker_info)
            await stop.wait()
        else:
            start.cancel()
        log.info("shutting down: draining for up to %.1fs", server_cfg.drain_timeout_s)
        await api.drain(server_cfg.drain_timeout_s)
    finally:
        await engine.shutdown()
        await runner.cleanup()
