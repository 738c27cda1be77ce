"""What one iteration looks like to a cost model, and the interface every cost model implements.

The simulator's schedulers describe each iteration only by these sums, so a cost model never sees
requests, and any model (roofline, fitted CPU table) can replace another without touching a scheduler.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import NamedTuple, Protocol, runtime_checkable


class BatchShape(NamedTuple):
    """What a cost model sees of one iteration (a named tuple: one is made per simulated iteration, and a tuple is
    made three times faster than a frozen dataclass)."""

    prefill_seqs: int = 0  # sequences computing more than one new token (prefill, chunk, recompute)
    prefill_tokens: int = 0  # their new tokens, summed
    prefill_attn_pairs: float = 0.0  # sum of n*(c + (n+1)/2): causal query-key pairs, c = cached prefix, n = new
    prefill_kv_tokens: int = 0  # sum of (c + n): KV tokens attention reads/writes
    decode_seqs: int = 0  # sequences computing one new token
    decode_ctx_tokens: int = 0  # sum of their context lengths (tokens attended, the new one included)
    sampled: int = 0  # rows that go through the LM head (sequences that sample a token)

    @property
    def num_tokens(self) -> int:
        return self.prefill_tokens + self.decode_seqs

    @classmethod
    def of(cls, items: Iterable[tuple[int, int, bool]]) -> BatchShape:
        """From (cached c, new n, samples?) per sequence; n == 1 with c > 0 is a decode step.

        A one-token prompt (c == 0) counts as prefill: it runs the prefill path with nothing cached.
        """
        ps = pt = pkv = ds = dctx = smp = 0
        pairs = 0.0
        for c, n, samples in items:
            if n < 1 or c < 0:
                raise ValueError(f"a sequence needs n >= 1 new tokens and c >= 0 cached ones, got c={c}, n={n}")
            if n == 1 and c > 0:
                ds += 1
                dctx += c + 1
            else:
                ps += 1
                pt += n
                pairs += n * (c + (n + 1) / 2)
                pkv += c + n
            smp += bool(samples)
        return cls(ps, pt, pairs, pkv, ds, dctx, smp)


def shape_and_sampled(items, token: int, group: int = 0, group_ctx: int = 0) -> tuple[BatchShape, list]:
    """`BatchShape.of` a scheduled batch's (request, new tokens) items, and (request, `token`) for each request
    that samples: one pass over the requests (the simulator prices every iteration; building a tuple per request
    first cost as much as the cost model). A decode group's `group` members attending `group_ctx` tokens add to
    the shape; they sample without a row here (semipd_engine.core.decode_group)."""
    ps = pt = pkv = 0
    ds, dctx = group, group_ctx
    pairs = 0.0
    sampled = []
    for r, n in items:
        c = r.num_computed_tokens
        if n == 1 and c > 0:
            ds += 1
            dctx += c + 1
        else:
            if n < 1 or c < 0:
                raise ValueError(f"a sequence needs n >= 1 new tokens and c >= 0 cached ones, got c={c}, n={n}")
            ps += 1
            pt += n
            pairs += n * (c + (n + 1) / 2)
            pkv += c + n
        if c + n == len(r.prompt_token_ids) + len(r.output_token_ids):
            sampled.append((r, token))
    return BatchShape(ps, pt, pairs, pkv, ds, dctx, len(sampled) + group), sampled


@runtime_checkable
class CostModel(Protocol):
    """Seconds of one iteration on one model replica at full compute share."""

    name: str

    def iteration_time(self, shape: BatchShape) -> float: ...

    def decode_times(self, batch: int, ctx_tokens: int, steps: int) -> list[float]: ...

    def memory_bound_time(self, shape: BatchShape) -> float: ...

    def decode_times_memory_bound(self, batch: int, ctx_tokens: int, steps: int
                                  ) -> tuple[list[float], list[float]]: ...


class BaseCostModel:
    """Gives every cost model the generic decode fast-forward, defined by ``iteration_time`` itself."""

    name = "base"

    def iteration_time(self, shape: BatchShape) -> float:
        raise NotImplementedError

    def decode_times(self, batch: int, ctx_tokens: int, steps: int) -> list[float]:
        """Times of ``steps`` decode-only iterations whose summed context grows by ``batch`` each step."""
        return [
            self.iteration_time(BatchShape(decode_seqs=batch, decode_ctx_tokens=ctx_tokens + batch * i, sampled=batch))
            for i in range(steps)
        ]

    def memory_bound_time(self, shape: BatchShape) -> float:
        """Seconds of the iteration bound by memory bandwidth; a model that cannot tell says none."""
        return 0.0

    def decode_times_memory_bound(self, batch: int, ctx_tokens: int, steps: int
                                  ) -> tuple[list[float], list[float]]:
        """`decode_times` and, per iteration, its `memory_bound_time`."""
        shapes = [BatchShape(decode_seqs=batch, decode_ctx_tokens=ctx_tokens + batch * i, sampled=batch)
                  for i in range(steps)]
        return [self.iteration_time(s) for s in shapes], [self.memory_bound_time(s) for s in shapes]
