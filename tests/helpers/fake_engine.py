"""An in-process stand-in for an engine client: the server's whole HTTP path with no worker processes."""

from __future__ import annotations

import asyncio
from typing import Optional

from semipd_engine.config import EngineConfig, ModelConfig, freeze
from semipd_engine.core.request import Request, RequestOutput
from semipd_engine.process.engine_client import EngineClient, EngineDead


class FakeEngine(EngineClient):
    """Answers every request with tokens `token_ids` (cycled) up to max_tokens, `delay_s` apart."""

    def __init__(self, name: str = "unified_chunked", max_model_len: int = 256, token_ids=(300, 301, 302),
                 delay_s: float = 0.0):
        super().__init__(freeze(ModelConfig, {}), freeze(EngineConfig, {"name": name}))
        self.token_ids, self.delay_s = tuple(token_ids), delay_s
        self.worker_info = {"fake": {"max_model_len": max_model_len, "kv_blocks_total": 8, "pid": 0}}
        self.requests: dict[str, Request] = {}
        self.aborted: list[str] = []
        self._tasks: dict[str, asyncio.Task] = {}

    async def start(self, timeout_s: float) -> None:
        self._loop = asyncio.get_running_loop()
        self.state = "ready"

    async def shutdown(self, timeout_s: float = 5.0) -> None:
        self.state = "stopping"
        for t in self._tasks.values():
            t.cancel()

    def add(self, req: Request) -> asyncio.Queue:
        if not self.ready:
            raise EngineDead(self.dead_reason or "engine is not ready")
        q: asyncio.Queue = asyncio.Queue()
        self.requests[req.request_id] = req
        self._streams[req.request_id] = q
        self._tasks[req.request_id] = asyncio.get_running_loop().create_task(self._run(req, q))
        return q

    async def _run(self, req: Request, q: asyncio.Queue) -> None:
        n = req.params.max_tokens
        for i in range(n):
            if self.delay_s:
                await asyncio.sleep(self.delay_s)
            if req.request_id not in self._streams:
                return
            done = i == n - 1
            q.put_nowait(RequestOutput(req.request_id, (self.token_ids[i % len(self.token_ids)],), (0.0,), done,
                                       "length" if done else None, req.num_prompt_tokens, i + 1))
        self._streams.pop(req.request_id, None)

    def abort(self, request_id: str) -> None:
        if self._streams.pop(request_id, None) is not None:
            self.aborted.append(request_id)

    def fail(self, reason: str, state: str = "dead") -> None:
        self.state = state
        if state == "dead":
            self.dead_reason = reason
        else:
            self.restart_reason = reason



def body_error(payload: Optional[dict]) -> dict:
    """The error object of an OpenAI-style error body (asserts its shape)."""
    assert isinstance(payload, dict) and set(payload) == {"error"}, payload
    err = payload["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"], err
    return err
