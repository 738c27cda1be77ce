"""Test double: an OpenAI-style streaming server with controlled TTFT and inter-token delay.

Stands in for vLLM/SGLang/this project's engines in load-generator tests, on
/v1/completions and /v1/chat/completions (the last message's content is the prompt). Fault
injection: a prompt containing "FAIL500" answers HTTP 500, "DROP" closes the
connection mid-stream.
"""

from __future__ import annotations

import asyncio
import json
import threading
import time

from aiohttp import web


class MockOpenAIServer:
    def __init__(self, ttft_s: float = 0.05, itl_s: float = 0.01, serial: bool = False, port: int = 0,
                 max_model_len: int | None = None):
        self.ttft_s, self.itl_s = ttft_s, itl_s
        self.max_model_len = max_model_len  # reported in /v1/models, as vLLM does
        self.max_tokens: list[int] = []  # what each generation request asked for
        # serial: one request at a time (a single-server queue), so latency grows with the load.
        self.serial = serial
        self.received: list[float] = []  # arrival times (monotonic) of completion requests
        self.writes: list[list[float]] = []  # per request, when each token chunk was written
        self.paths: list[str] = []  # the endpoint of each generation request
        self.bodies: list[dict] = []  # each generation request's JSON body
        self.port = port
        self._loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self):
        self._thread.start()
        self._ready.wait(10)
        return self

    def __exit__(self, *exc):
        self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(10)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)
        self._loop.run_until_complete(self._serve())

    async def _serve(self) -> None:
        self._stop = asyncio.Event()
        self._busy = asyncio.Lock()
        app = web.Application()
        app.add_routes([web.get("/v1/models", self.models), web.post("/v1/completions", self.completions),
                        web.post("/v1/chat/completions", self.completions)])
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", self.port)
        await site.start()
        self.port = site._server.sockets[0].getsockname()[1]
        self._ready.set()
        await self._stop.wait()
        await runner.cleanup()

    async def models(self, request):
        entry = {"id": "mock", "object": "model"}
        if self.max_model_len:
            entry["max_model_len"] = self.max_model_len
        return web.json_response({"object": "list", "data": [entry]})

    async def completions(self, request):
        if self.serial:
            async with self._busy:
                return await self._complete(request)
        return await self._complete(request)

    async def _complete(self, request):
        t_arrival = time.monotonic()
        self.received.append(t_arrival)
        body = await request.json()
        self.bodies.append(body)
        chat = "messages" in body
        prompt = body["messages"][-1]["content"] if chat else body["prompt"]
        self.paths.append(request.path)
        n = body.get("max_tokens", 16)
        self.max_tokens.append(n)
        if isinstance(prompt, str) and "FAIL500" in prompt:
            return web.json_response({"error": {"message": "boom", "type": "server_error"}}, status=500)
        n_prompt = len(prompt) if isinstance(prompt, list) else len(prompt.split())
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        writes: list[float] = []
        self.writes.append(writes)
        # Absolute deadlines: token i is written at arrival + ttft + i * itl.
        for i in range(n):
            await asyncio.sleep(max(0.0, t_arrival + self.ttft_s + i * self.itl_s - time.monotonic()))
            if i == 2 and isinstance(prompt, str) and "DROP" in prompt:
                request.transport.close()
                return resp
            if chat:
                chunk = {"id": "x", "object": "chat.completion.chunk", "choices": [{"index": 0, "delta": {
                    "content": f"t{i} "}, "finish_reason": None}]}
            else:
                chunk = {"id": "x", "object": "text_completion", "choices": [{"index": 0, "text": f"t{i} ",
                                                                              "finish_reason": None}]}
            await resp.write(f"data: {json.dumps(chunk)}\n\n".encode())
            writes.append(time.monotonic())
        usage = {"prompt_tokens": n_prompt, "completion_tokens": n, "total_tokens": n_prompt + n}
        await resp.write(f"data: {json.dumps({'id': 'x', 'choices': [], 'usage': usage})}\n\n".encode())
        await resp.write(b"data: [DONE]\n\n")
        return resp


def main() -> None:
    """`python -m tests.helpers.mock_openai --port P`: the mock as a server process (an "external engine")."""
    import argparse

    ap = argparse.ArgumentParser()
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--ttft", type=float, default=0.02)
    ap.add_argument("--itl", type=float, default=0.005)
    args = ap.parse_args()
    with MockOpenAIServer(args.ttft, args.itl, port=args.port):
        threading.Event().wait()


if __name__ == "__main__":
    main()
