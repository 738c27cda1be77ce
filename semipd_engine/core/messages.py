"""Typed messages between the engine client (server process) and its worker processes.

Everything that crosses a process boundary is one of these frozen dataclasses
(slotted: the simulator builds a few per request); both ends dispatch on the type,
so a new message is a new class plus a handler, never another tagged tuple.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

from semipd_engine.core.request import Request, RequestOutput
from semipd_engine.core.scheduler import SchedulerState


# -- to a worker ---------------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class AddRequest:
    """A request to prefill: new from the server, or evicted by a decode worker for recompute."""

    request: Request


@dataclass(frozen=True, slots=True)
class AdoptRequest:
    """A prefilled request whose KV blocks are already in the receiver's pool (semi-PD hand-off)."""

    request: Request


@dataclass(frozen=True, slots=True)
class AbortRequest:
    request_id: str


@dataclass(frozen=True, slots=True)
class SetShare:
    """Apply a new compute share (core set) at the next iteration boundary."""

    cores: tuple[int, ...]
    share: int
    sent_at: float
    num_threads: int = 0  # 0 = one per core; fewer where the other phase's core set overlaps


@dataclass(frozen=True, slots=True)
class OfferKV:
    """Disaggregated: a prefilled request whose blocks sit in `source`'s pool, to be copied."""

    request: Request
    source: str


@dataclass(frozen=True, slots=True)
class ReleaseKV:
    """Disaggregated: the decode instance holds its copy; the prefill instance may free its blocks."""

    request_id: str


@dataclass(frozen=True, slots=True)
class ResetPrefixCache:
    """Forget every cached prefix of the worker's pool (blocks in use stay)."""


@dataclass(frozen=True, slots=True)
class Shutdown:
    pass


@dataclass(frozen=True, slots=True)
class HandOver:
    """Stop at this iteration boundary and hand everything held to a successor (its standby, ready with a new MPS
    share); messages queued after this one are the successor's."""

    sent_at: float


@dataclass(frozen=True, slots=True)
class WorkerState:
    """What a retiring worker holds, for its successor."""

    scheduler: SchedulerState
    aborted: tuple[str, ...]  # requests aborted while in transit: dropped when they arrive


@dataclass(frozen=True, slots=True)
class TakeOver:
    """To a standby: its predecessor's state; go on from it."""

    state: WorkerState
    handover_at: float  # when the predecessor stopped (its last iteration had ended)
    switch_sent_at: float  # when the share was asked for


# -- from a worker ---------------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class WorkerReady:
    worker: str
    info: dict[str, Any]


@dataclass(frozen=True, slots=True)
class StepReport:
    """One iteration's outputs and the pool/queue state after it (stats may be an idle snapshot)."""

    worker: str
    outputs: list[RequestOutput]
    stats: Optional[Any]  # engine_core.IterationStats


@dataclass(frozen=True, slots=True)
class StandbyReady:
    """A standby started with its new share (model and pool mapped) and waits to take over."""

    worker: str
    info: dict[str, Any]


@dataclass(frozen=True, slots=True)
class StandbyFailed:
    """A standby could not start: the worker it was to replace keeps running with its old share."""

    worker: str
    traceback: str


@dataclass(frozen=True, slots=True)
class Retired:
    """A worker stopped after a `HandOver` and exits; its state goes to the standby."""

    worker: str
    state: WorkerState
    handover_at: float
    sent_at: float


@dataclass(frozen=True, slots=True)
class ShareSwitched:
    worker: str
    phase: str  # "prefill" | "decode"
    share: int
    cores: tuple[int, ...]
    stall_s: float
    delay_s: float
    sms: int = 0  # SMs of its green context (0: every SM, or a CPU share)


@dataclass(frozen=True, slots=True)
class KVTransferred:
    worker: str
    nbytes: int
    seconds: float
    cached_blocks: int = 0  # not copied: the receiver held them in its prefix cache


@dataclass(frozen=True, slots=True)
class WorkerFailed:
    worker: str
    traceback: str


# -- from the engine client to the server (events, not crossing a process boundary) --------------------
@dataclass(frozen=True, slots=True)
class WorkersRestarted:
    """The engine replaced its workers after one failed; in-flight requests were failed."""

    reason: str
    seconds: float  # from noticing the failure to every new worker ready
    restarts: int  # since the engine started
    worker_info: dict[str, dict[str, Any]]
