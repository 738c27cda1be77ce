"""The one request type every engine schedules, and its sampling parameters.

A request's tokens are ``prompt_token_ids + output_token_ids``; the KV cache
holds the first ``num_computed_tokens`` of them. Prefill, a prefill chunk, a
decode step and a recompute after preemption are all the same operation:
compute ``tokens[num_computed:num_computed + n]`` and, when that reaches the
end, sample one more token.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Optional

# Below this temperature sampling is greedy: logits / T overflows float32 long before T reaches 0
# (any |logit| > 3.4e38 * T is inf), and the distribution is a point mass well above it anyway.
MIN_TEMPERATURE = 1e-5
# Per-request seeds feed a 64-bit generator: seeds are reduced modulo 2**64 (the API accepts [-2**63, 2**64)).
SEED_MODULUS = 2**64


@dataclass(frozen=True)
class SamplingParams:
    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1  # -1 = disabled
    seed: Optional[int] = None
    ignore_eos: bool = False
    # Stop strings are matched on detokenized text by the server front end.
    stop: tuple[str, ...] = ()

    @property
    def greedy(self) -> bool:
        return self.temperature < MIN_TEMPERATURE or self.top_k == 1


class RequestStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


class FinishReason(str, enum.Enum):
    STOP = "stop"  # EOS or a stop string
    LENGTH = "length"  # max_tokens or the context limit
    ABORT = "abort"  # client went away or server shut down
    ERROR = "error"  # the engine failed


@dataclass(slots=True)
class Timestamps:
    """Server-side lifecycle, all read from the engine's clock (`semipd_engine.core.clock`): wall
    monotonic time for real engines (comparable across processes), virtual seconds in the simulator."""

    arrival: float = 0.0
    first_scheduled: Optional[float] = None
    first_token: Optional[float] = None
    tokens: list[float] = field(default_factory=list)
    finished: Optional[float] = None
    preemptions: list[float] = field(default_factory=list)


@dataclass(eq=False, slots=True, weakref_slot=True)  # identity: queues use `in` / `remove`; slots: read every iteration
class Request:
    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    eos_token_ids: tuple[int, ...] = ()
    output_token_ids: list[int] = field(default_factory=list)
    num_computed_tokens: int = 0
    block_table: list[int] = field(default_factory=list)
    status: RequestStatus = RequestStatus.WAITING
    finish_reason: Optional[FinishReason] = None
    times: Timestamps = field(default_factory=Timestamps)
    # torch.Generator state (bytes) for seeded sampling; travels with the request between workers.
    rng_state: Optional[bytes] = None
    # Prefix caching: requests with different salts never share blocks (vLLM's `cache_salt`).
    cache_salt: Optional[str] = None
    block_hashes: list[int] = field(default_factory=list)  # of its full blocks, as far as computed (block_pool)
    num_registered_blocks: int = 0  # of its block table, how many are registered in the pool's prefix cache
    num_cached_tokens: Optional[int] = None  # prompt tokens found cached at its first admission (usage)
    placeholder_tokens: bool = False  # stand-in token ids (the simulator's): blocks hash by salt and position
    run_seq: int = 0  # when it joined its scheduler's running list (the list's order, for the decode group)

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_token_ids) + len(self.output_token_ids)

    @property
    def num_remaining(self) -> int:
        """Tokens whose KV is not yet in the cache (1 for a decoding request)."""
        return self.num_tokens - self.num_computed_tokens

    @property
    def in_decode(self) -> bool:
        return bool(self.output_token_ids) and self.num_remaining == 1

    def token_ids(self, start: int, end: int) -> list[int]:
        n = len(self.prompt_token_ids)
        if end <= n:
            return self.prompt_token_ids[start:end]
        if start >= n:  # decode steps: never copy the whole context
            return self.output_token_ids[start - n : end - n]
        return self.prompt_token_ids[start:] + self.output_token_ids[: end - n]


@dataclass(frozen=True)
class RequestOutput:
    """What a worker reports for one request after one iteration."""

    request_id: str
    new_token_ids: tuple[int, ...]
    token_times: tuple[float, ...]
    finished: bool
    finish_reason: Optional[str]
    num_prompt_tokens: int
    num_output_tokens: int
    # Lifecycle, filled in on the finishing output only.
    first_scheduled: Optional[float] = None
    preemptions: tuple[float, ...] = ()
    error: Optional[str] = None
    num_cached_tokens: int = 0
