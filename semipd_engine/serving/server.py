"""OpenAI-compatible HTTP front end (aiohttp), the same for every engine.

The server tokenizes, validates, streams detokenized text, matches stop
strings, keeps /metrics, and aborts a request whose client goes away. What
runs the model is the `EngineClient` it is given.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import copy
import hmac
import ipaddress
import json
import logging
import os
import signal
import time
import uuid
from typing import Any, Optional

from aiohttp import web

from semipd_engine.core.request import Request, RequestOutput, Timestamps
from semipd_engine.process.engine_client import EngineClient, EngineDead
from semipd_engine.serving.detokenizer import IncrementalDetokenizer
from semipd_engine.serving.metrics import EngineMetrics
from semipd_engine.serving.protocol import (
    ApiError,
    chat_token_ids,
    check_keys,
    completion_body,
    parse_json_body,
    parse_messages,
    parse_prompt,
    parse_sampling,
    return_token_ids,
    usage,
)
from semipd_engine.shares.partition import Partition

log = logging.getLogger(__name__)
SSE_HEADERS = {"Content-Type": "text/event-stream", "Cache-Control": "no-cache", "Connection": "keep-alive"}
OPEN_PATHS = frozenset({"/health", "/metrics"})  # never behind the API key (probes, scrapers)
API_KEY_ENV = "SEMIPD_API_KEY"
INLINE_TOKENIZE_BYTES = 16 * 1024  # longer text is tokenized off the event loop
MAX_BODY_BYTES = 64 * 2**20
_HTTP_CODES = {401: "invalid_api_key", 404: "not_found", 405: "method_not_allowed", 413: "request_too_large",
               415: "unsupported_media_type"}


def error_response(err: ApiError, headers: Optional[dict] = None) -> web.Response:
    return web.json_response(err.body(), status=err.status, headers=headers)


def http_error(request: web.Request, e: web.HTTPException) -> tuple[ApiError, dict]:
    """aiohttp's own errors (unknown route, wrong method, body too large, ...) as OpenAI-style errors."""
    status = e.status
    if status == 404:
        message = f"{request.method} {request.path}: no such route"
    elif status == 405:
        allowed = sorted(getattr(e, "allowed_methods", ()) or ())
        message = f"method {request.method} is not allowed on {request.path} (allowed: {', '.join(allowed)})"
    else:
        message = e.text or e.reason
        if message.startswith(f"{status}: "):
            message = message[len(f"{status}: "):]
    err = ApiError(message, status=status, type_="server_error" if status >= 500 else "invalid_request_error",
                   code=_HTTP_CODES.get(status))
    keep = {k: v for k, v in e.headers.items() if k.lower() in ("allow", "www-authenticate", "retry-after")}
    return err, keep


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # a hostname, "0.0.0.0", "::" or "" (every interface)


def _encode(tokenizer, text: str) -> list[int]:
    return tokenizer.encode(text)


class ApiServer:
    def __init__(self, engine: EngineClient, tokenizer, vocab_size: int, model_name: str,
                 request_log: Optional[str] = None, api_key: Optional[str] = None):
        self.engine, self.tok, self.vocab_size, self.model_name = engine, tokenizer, vocab_size, model_name
        self.api_key = api_key or None
        self.metrics = EngineMetrics(engine.pool_label)
        engine.subscribe(self.metrics)
        if engine.partition_control is not None:
            self.metrics.add_partition_metrics()
        if engine.controller is not None:
            self.metrics.add_controller_metrics()
        self.draining = False
        self._unknown_seen: set[str] = set()
        self._log_file = open(request_log, "a", buffering=1) if request_log else None
        self.created = int(time.time())
        # A token covers at most this many bytes of text (x4: a normalizer may fold multi-byte characters), so
        # a text of more than max_model_len x this cannot fit the context: it is refused without tokenizing.
        self.max_token_bytes = 4 * max((len(t.encode("utf-8", "surrogatepass")) for t in tokenizer.get_vocab()),
                                       default=64)
        # Long texts are tokenized on one background thread with its own copy of the tokenizer (a HF
        # tokenizer object must not be used by two threads at once); short ones inline.
        self._bg_tok = None
        self._tok_pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="tokenize")

    def app(self) -> web.Application:
        app = web.Application(client_max_size=MAX_BODY_BYTES, middlewares=[self._errors, self._auth])
        app.add_routes([
            web.get("/health", self.health),
            web.get("/v1/models", self.models),
            web.post("/v1/completions", self.completions),
            web.post("/v1/chat/completions", self.chat_completions),
            web.get("/metrics", self.prometheus),
            web.post("/reset_prefix_cache", self.reset_prefix_cache),
        ])
        if self.engine.partition_control is not None:
            app.add_routes([web.get("/partition", self.get_partition), web.post("/partition", self.post_partition)])
        return app

    # -- middlewares -------------------------------------------------------------------------
    @web.middleware
    async def _errors(self, request: web.Request, handler) -> web.StreamResponse:
        """Every error leaves as an OpenAI-style JSON body, whatever raised it."""
        try:
            return await handler(request)
        except ApiError as e:
            self._log_rejected(request, e)
            return error_response(e, e.headers)
        except web.HTTPException as e:
            if e.status < 400:
                raise
            err, headers = http_error(request, e)
            self._log_rejected(request, err)
            return error_response(err, headers)
        except (asyncio.CancelledError, ConnectionResetError):
            raise
        except Exception:
            log.exception("internal error answering %s %s", request.method, request.path)
            if request.writer.output_size > 0:
                raise  # a response has started: nothing valid can follow, aiohttp closes the connection
            return error_response(ApiError("internal server error", status=500, type_="server_error"))

    @staticmethod
    def _log_rejected(request: web.Request, e: ApiError) -> None:
        """Every refused request leaves a line: a client sending something this server does not take shows up."""
        log.log(logging.ERROR if e.status >= 500 and e.status != 503 else logging.WARNING,
                "rejected %s %s from %s: %d %s%s", request.method, request.path, request.remote, e.status, e.message,
                f" (param {e.param})" if e.param else "")

    @web.middleware
    async def _auth(self, request: web.Request, handler) -> web.StreamResponse:
        if self.api_key and request.path not in OPEN_PATHS:
            got = request.headers.get("Authorization", "")
            if not hmac.compare_digest(got.encode("utf-8", "replace"), f"Bearer {self.api_key}".encode()):
                raise ApiError("missing or incorrect API key: send 'Authorization: Bearer <key>'", status=401,
                               code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})
        return await handler(request)

    async def _json(self, request: web.Request) -> Any:
        raw = await request.read()  # over client_max_size: HTTPRequestEntityTooLarge -> 413 JSON
        return parse_json_body(raw, request.charset)

    async def reset_prefix_cache(self, request: web.Request) -> web.Response:
        """vLLM's endpoint: cached prefixes are forgotten (a benchmark's cold start without a restart)."""
        self.engine.reset_prefix_cache()
        return web.json_response({"reset": True})

    # -- semi-PD partition control ---------------------------------------------------------
    async def get_partition(self, request: web.Request) -> web.Response:
        return web.json_response(self.engine.partition_control.describe())

    async def post_partition(self, request: web.Request) -> web.Response:
        control = self.engine.partition_control
        # JSON only: a browser can send text/plain cross-site without a preflight, JSON it cannot.
        if request.content_type != "application/json":
            raise ApiError(f"POST /partition takes 'Content-Type: application/json', got {request.content_type!r}",
                           status=415, code="unsupported_media_type")
        body = await self._json(request)
        if not isinstance(body, dict):
            raise ApiError("request body must be a JSON object")
        try:
            p = Partition(body.get("prefill_share", control.partition.prefill_share),
                          body.get("decode_share", control.partition.decode_share))
            return web.json_response(control.set_partition(p))
        except ValueError as e:
            param = "decode_share" if "decode_share" in str(e) else "prefill_share"
            raise ApiError(str(e), param) from None

    # -- simple endpoints --------------------------------------------------------
    async def health(self, request: web.Request) -> web.Response:
        info = {"engine": self.engine.name, **self.engine.status()}
        state = self.engine.state
        if state == "dead":
            return web.json_response({"status": "error", **info}, status=503)
        if state == "restarting":
            return web.json_response({"status": "restarting", **info}, status=503)
        if self.draining or not self.engine.ready:
            return web.json_response({"status": "unavailable", **info}, status=503)
        return web.json_response({"status": "ok", **info})

    async def models(self, request: web.Request) -> web.Response:
        if not self.engine.ready:
            raise ApiError("engine is not ready", status=503, type_="server_error")
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
            req, stream, include_usage, with_ids = await self._parse(request, chat, arrival)
            out_q = self.engine.add(req)
        except EngineDead as e:
            raise ApiError(str(e), status=503, type_="server_error") from None
        rid, created = req.request_id, int(time.time())
        detok = IncrementalDetokenizer(self.tok, req.params.stop)
        resp: Optional[web.StreamResponse] = None
        done = False  # the engine is finished with the request
        delivered = False  # the client has the whole answer
        n_out, finish, error = 0, None, None
        ids: list[int] = []  # the answer's ids, and those not yet sent in a chunk (return_token_ids)
        sent_ids = 0
        try:
            if stream:
                resp = web.StreamResponse(headers=SSE_HEADERS)
                await resp.prepare(request)
            first = True
            while not done:
                out: RequestOutput = await out_q.get()
                if out.error:
                    error, finish, done = out.error, out.finish_reason or "error", True
                    break
                detok.add(out.new_token_ids)
                if with_ids:
                    ids.extend(out.new_token_ids)
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
                                           created, first, token_ids=ids[sent_ids:] if with_ids else None,
                                           prompt_token_ids=req.prompt_token_ids if with_ids and first else None)
                    first, sent_ids = False, len(ids)
                    await self._send_event(resp, body)
            if error:
                err = ApiError(f"request failed in the engine: {error}", status=500, type_="server_error")
                if resp is None:
                    delivered = True
                    return error_response(err)
                await self._send_event(resp, err.body())
            if resp is not None:
                if include_usage:
                    tail = completion_body(rid, self.model_name, chat, None, None, True, created)
                    tail["choices"], tail["usage"] = [], usage(req.num_prompt_tokens, n_out,
                                                                  req.num_cached_tokens or 0)
                    await self._send_event(resp, tail)
                await resp.write(b"data: [DONE]\n\n")
                await resp.write_eof()
                delivered = True
                return resp
            body = completion_body(rid, self.model_name, chat, detok.text, finish, False, created,
                                   token_ids=ids if with_ids else None,
                                   prompt_token_ids=req.prompt_token_ids if with_ids else None)
            body["usage"] = usage(req.num_prompt_tokens, n_out, req.num_cached_tokens or 0)
            delivered = True
            return web.json_response(body)
        except ConnectionResetError:  # a write found the client gone (aiohttp's ClientConnectionResetError)
            log.info("client went away during %s: aborted", rid)
            return resp if resp is not None else web.Response(status=499)
        except asyncio.CancelledError:  # the client went away while we waited (handler_cancellation)
            log.info("client went away: aborting %s", rid)
            raise
        finally:
            if not done:
                self.engine.abort(rid)
            # Exactly once per request: what the engine said if the client got all of it, else an abort.
            self._finish(req, n_out, (finish or "error") if delivered else "abort")

    async def _send_event(self, resp: web.StreamResponse, obj: dict) -> None:
        await resp.write(f"data: {json.dumps(obj)}\n\n".encode())

    async def _parse(self, request: web.Request, chat: bool, arrival: float):
        if self.draining:
            raise ApiError("server is shutting down", status=503, type_="server_error")
        if not self.engine.ready:
            reason = self.engine.status().get("reason") or "engine is not ready"
            raise ApiError(f"engine is {self.engine.state}: {reason}", status=503, type_="server_error")
        body = await self._json(request)
        if not isinstance(body, dict):
            raise ApiError("request body must be a JSON object")
        model = body.get("model")
        if model is not None and model != self.model_name:
            raise ApiError(f"model {model!r} does not exist; this server serves {self.model_name!r}", "model",
                           status=404, code="model_not_found")
        unknown = [k for k in check_keys(body, "chat" if chat else "completions") if k not in self._unknown_seen]
        if unknown:  # tolerated as the OpenAI API does, and said once: a typo in a benchmark's key shows up
            self._unknown_seen.update(unknown)
            log.warning("ignoring request keys this server does not know: %s (%s; each is reported once)",
                        ", ".join(unknown), request.path)
        max_len = self.engine.max_model_len
        max_bytes = max_len * self.max_token_bytes
        if chat:
            msgs = parse_messages(body, bool(getattr(self.tok, "chat_template", None)), max_bytes, max_len)
            size = sum(len(m["content"]) for m in msgs)
            ids = await self._tokenize(chat_token_ids, msgs, size=size)
        else:
            prompt = parse_prompt(body, self.vocab_size, max_bytes, max_len)
            ids = prompt if isinstance(prompt, list) else await self._tokenize(_encode, prompt, size=len(prompt))
        params, stream, include_usage = parse_sampling(body, len(ids), max_len)
        prefix = "chatcmpl" if chat else "cmpl"
        req = Request(f"{prefix}-{uuid.uuid4().hex}", ids, params, times=Timestamps(arrival=arrival))
        return req, stream, include_usage, return_token_ids(body)

    async def _tokenize(self, fn, arg, size: int) -> list[int]:
        """fn(tokenizer, arg); long inputs on the background thread, so /health and streams never stall."""
        if size <= INLINE_TOKENIZE_BYTES:
            return fn(self.tok, arg)
        if self._bg_tok is None:
            self._bg_tok = copy.deepcopy(self.tok)
        return await asyncio.get_running_loop().run_in_executor(self._tok_pool, fn, self._bg_tok, arg)

    def _record_tokens(self, req: Request, out: RequestOutput) -> None:
        if out.token_times and req.times.first_token is None:
            req.times.first_token = out.token_times[0]
            req.num_cached_tokens = out.num_cached_tokens
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
                "cached_tokens": req.num_cached_tokens or 0, "finish_reason": reason,
            }) + "\n")

    async def drain(self, timeout_s: float) -> None:
        """Stop taking requests; give in-flight ones `timeout_s` to finish."""
        self.draining = True
        deadline = time.monotonic() + timeout_s
        while self.engine.num_in_flight and time.monotonic() < deadline:
            await asyncio.sleep(0.05)

    def close(self) -> None:
        self._tok_pool.shutdown(wait=False, cancel_futures=True)
        if self._log_file:
            self._log_file.close()


async def run_server(engine: EngineClient, tokenizer, vocab_size: int, model_name: str, server_cfg) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    api_key = server_cfg.api_key or os.environ.get(API_KEY_ENV) or None
    if not api_key and not is_loopback(server_cfg.host):
        log.warning("binding %r without an API key: anyone who can reach this port can generate and change the "
                    "partition; set server.api_key (or %s) to require 'Authorization: Bearer <key>'",
                    server_cfg.host, API_KEY_ENV)
    api = ApiServer(engine, tokenizer, vocab_size, model_name, server_cfg.request_log, api_key)
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
        api.close()
