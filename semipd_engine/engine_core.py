"""EngineCore: scheduler + model runner + postprocessing, one iteration at a time.

This is what a worker process runs. It is also usable in-process
(`EngineCore.generate`) for offline batch inference, tests and benchmarks.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Optional

from semipd_engine.kv_cache import BlockPool, KVCache
from semipd_engine.model import load_weights, resolve
from semipd_engine.model.loader import build_model, torch_dtype
from semipd_engine.request import FinishReason, Request, RequestOutput, RequestStatus, SamplingParams
from semipd_engine.runner import ModelRunner
from semipd_engine.scheduler import Scheduler
from semipd_engine.tokenizer import stop_token_ids

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class IterationStats:
    phase: str  # "prefill" | "decode" | "mixed"
    duration_s: float
    num_prefill_tokens: int
    num_decode_tokens: int
    kv_blocks_used: int
    kv_blocks_total: int
    num_running: int
    num_waiting: int
    preemptions_total: int


def phase_of(num_prefill: int, num_decode: int) -> str:
    if num_prefill and num_decode:
        return "mixed"
    return "prefill" if num_prefill else "decode"


class EngineCore:
    def __init__(self, model_cfg, engine_cfg, policy: Optional[str] = None, model=None, kv: KVCache | None = None,
                 pool: BlockPool | None = None):
        self.model_cfg, self.engine_cfg = model_cfg, engine_cfg
        loaded = resolve(model_cfg)
        self.spec, self.tokenizer = loaded.spec, loaded.tokenizer
        self.eos_token_ids = stop_token_ids(self.tokenizer, self.spec.eos_token_ids)
        dtype = torch_dtype(model_cfg.dtype)
        if model is None:
            model = build_model(self.spec, load_weights(model_cfg, self.spec), dtype,
                                model_cfg.attention_backend, model_cfg.device)
        if kv is None:
            num_blocks = engine_cfg.num_kv_blocks or KVCache.blocks_for_memory(
                self.spec, engine_cfg.block_size, dtype, engine_cfg.kv_cache_mb)
            kv = KVCache(self.spec, num_blocks, engine_cfg.block_size, dtype, model_cfg.device)
        self.model, self.kv = model, kv
        self.pool = pool or BlockPool(kv.num_blocks, kv.block_size, engine_cfg.watermark)
        self.max_model_len = self._max_model_len()
        self.scheduler = Scheduler(self.pool, policy or engine_cfg.policy, engine_cfg.max_num_seqs,
                                   engine_cfg.max_num_batched_tokens)
        self.runner = ModelRunner(model, kv)
        self.requests: dict[str, Request] = {}
        # Phase-split engines: prefilled requests leave for the decode worker (`handoffs`),
        # preempted decodes go back to the prefill worker (`evicted`); both keep their state.
        self.handoffs: list[Request] = []
        self.evicted: list[Request] = []

    def _max_model_len(self) -> int:
        limit = self.model_cfg.max_model_len or self.spec.max_position_embeddings
        # A lone request must always fit in the pool, or preemption could not make progress.
        capacity = (self.pool.num_blocks - self.pool.watermark_blocks) * self.pool.block_size
        if capacity < limit:
            log.warning("KV pool holds %d tokens < max_model_len %d: capping", capacity, limit)
        return min(limit, capacity, self.spec.max_position_embeddings)

    # -- requests -------------------------------------------------------------
    def add_request(self, req: Request) -> None:
        if not req.eos_token_ids:
            req.eos_token_ids = self.eos_token_ids
        self.requests[req.request_id] = req
        self.scheduler.add(req)

    def abort(self, request_id: str) -> bool:
        req = self.requests.pop(request_id, None)
        if req is None:
            return False
        self.scheduler.finish(req)
        req.status, req.finish_reason = RequestStatus.FINISHED, FinishReason.ABORT
        return True

    def adopt(self, req: Request) -> None:
        """Take over a request prefilled elsewhere: its KV blocks are already in the pool."""
        req.status = RequestStatus.RUNNING
        self.requests[req.request_id] = req
        self.scheduler.running.append(req)

    def has_work(self) -> bool:
        return self.scheduler.has_work()

    # -- one iteration: schedule -> run -> postprocess ------------------------
    def step(self) -> tuple[list[RequestOutput], Optional[IterationStats]]:
        batch = self.scheduler.schedule()
        if self.scheduler.policy == "decode_only" and self.scheduler.waiting:
            # A decode worker cannot prefill: preempted requests go back for recompute.
            for req in self.scheduler.waiting:
                self.requests.pop(req.request_id, None)
                self.evicted.append(req)
            self.scheduler.waiting.clear()
        if not batch:
            return [], None
        n_prefill = batch.num_prefill_tokens
        t0 = time.perf_counter()
        sampled = self.runner.run(batch.items)
        duration = time.perf_counter() - t0
        for req, n in batch.items:
            req.num_computed_tokens += n
        outputs = [self._postprocess(req, tok, time.monotonic()) for req, tok in sampled]
        return outputs, self.snapshot(phase_of(n_prefill, batch.num_tokens - n_prefill), duration,
                                      n_prefill, batch.num_tokens - n_prefill)

    def snapshot(self, phase: str = "idle", duration: float = 0.0, n_prefill: int = 0,
                 n_decode: int = 0) -> IterationStats:
        """Pool and queue state; phase "idle" reports state without an iteration."""
        return IterationStats(
            phase=phase, duration_s=duration, num_prefill_tokens=n_prefill, num_decode_tokens=n_decode,
            kv_blocks_used=self.pool.num_used, kv_blocks_total=self.pool.num_blocks,
            num_running=len(self.scheduler.running), num_waiting=len(self.scheduler.waiting),
            preemptions_total=self.scheduler.num_preemptions,
        )

    def _postprocess(self, req: Request, token: int, now: float) -> RequestOutput:
        req.append_token(token, now)
        reason = req.check_finished(self.max_model_len)
        if reason is not None:
            req.status, req.finish_reason = RequestStatus.FINISHED, reason
            req.times.finished = now
            self.scheduler.finish(req)
            self.requests.pop(req.request_id, None)
        elif self.scheduler.policy == "prefill_only":
            self.scheduler.running.remove(req)  # blocks stay allocated: they travel with it
            self.requests.pop(req.request_id, None)
            self.handoffs.append(req)
        return make_output(req, (token,), (now,))

    # -- offline API ----------------------------------------------------------
    def generate(self, prompts: list[list[int]], params: SamplingParams | list[SamplingParams]) -> list[list[int]]:
        """Run prompts to completion; returns the output token ids of each."""
        plist = params if isinstance(params, list) else [params] * len(prompts)
        reqs = [Request(f"offline-{i}", list(p), sp) for i, (p, sp) in enumerate(zip(prompts, plist))]
        for r in reqs:
            self.add_request(r)
        while self.has_work():
            self.step()
        return [r.output_token_ids for r in reqs]


def make_output(req: Request, tokens: tuple[int, ...], times: tuple[float, ...], error: str | None = None) -> RequestOutput:
    done = req.status is RequestStatus.FINISHED
    return RequestOutput(
        request_id=req.request_id, new_token_ids=tokens, token_times=times, finished=done,
        finish_reason=req.finish_reason.value if done and req.finish_reason else None,
        num_prompt_tokens=req.num_prompt_tokens, num_output_tokens=len(req.output_token_ids),
        first_scheduled=req.times.first_scheduled if done else None,
        preemptions=tuple(req.times.preemptions) if done else (), error=error,
    )
