"""The scheduling policies, registered by name (`engine.policy`, or fixed by the engine's composition).

- `prefill_priority` (vLLM default): new prompts first, whole, up to the token
  budget; a prefill iteration runs no decodes; otherwise decode every running request.
- `chunked` (Sarathi-Serve stall-free batching): every running decode first,
  then chunks of partly prefilled prompts, then new prompts, up to the budget.
- `prefill_only`: chunked prefill that hands each request off once its prompt is
  done and its first token sampled (semi-PD's prefill worker, a DistServe prefill instance).
- `decode_only`: continuous batching of adopted requests, at most `max_num_seqs` at a time (the rest wait,
  holding their blocks); requests it preempts are evicted, back to a prefill worker for recompute (it
  cannot prefill).
"""

from __future__ import annotations

from semipd_engine.core.request import Request
from semipd_engine.core.scheduler import ScheduledBatch, Scheduler, StepOutcome
from semipd_engine.registry import Registry

POLICIES: Registry[type[Scheduler]] = Registry("scheduler policy", "engine.policy")


@POLICIES.register("prefill_priority")
class PrefillPriority(Scheduler):
    name = "prefill_priority"

    def _fill(self, batch: ScheduledBatch, now: float) -> None:
        self._admit(batch, self.budget, chunk=False)
        if not batch:
            self._decodes(batch, now)


@POLICIES.register("chunked")
class Chunked(Scheduler):
    name = "chunked"

    def _fill(self, batch: ScheduledBatch, now: float) -> None:
        budget = self.budget - self._decodes(batch, now)
        budget = self._continue_prefills(batch, budget)
        self._admit(batch, budget, chunk=True)


@POLICIES.register("prefill_only")
class PrefillOnly(Scheduler):
    name = "prefill_only"
    hands_off = True

    def _fill(self, batch: ScheduledBatch, now: float) -> None:
        # Everything running here is mid-prompt (a request leaves with its first token), including a
        # recompute with one token left, which would otherwise look like a decode and never run.
        budget = self._continue_prefills(batch, self.budget, skip_decodes=False)
        self._admit(batch, budget, chunk=True)

    def _after_token(self, req: Request, out: StepOutcome) -> None:
        self._drop(req, free=False)  # its blocks travel with it
        out.handoffs.append(req)


@POLICIES.register("decode_only")
class DecodeOnly(Scheduler):
    name = "decode_only"
    runs_prefill = False

    def _fill(self, batch: ScheduledBatch, now: float) -> None:
        while self.parked and len(self.running) < self.max_num_seqs:
            self._unpark()
        self._decodes(batch, now)


def make_scheduler(policy: str, pool, engine_cfg, max_model_len: int) -> Scheduler:
    return POLICIES.get(policy)(pool, engine_cfg.max_num_seqs, engine_cfg.max_num_batched_tokens, max_model_len)
