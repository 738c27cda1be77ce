"""How a prefilled request reaches a decode worker: the one place the phase-split engines differ.

- `AdoptHandoff` (semi-PD): prefill and decode share one pool, so the request
  travels with its block table and the decode worker adopts it; no byte is copied.
- `TransferHandoff` (disaggregated): each instance owns its pool. The prefill side
  holds the blocks until the decode side has copied them (`TransferQueue`,
  FCFS with back-pressure) and answers `ReleaseKV`.

A worker that runs both phases (unified) has no hand-off at all.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Optional

from semipd_engine.core import block_pool
from semipd_engine.core.block_pool import BlockPool, free_request
from semipd_engine.core.kv_transfer import TransferQueue
from semipd_engine.core.messages import AdoptRequest, KVTransferred, OfferKV, ReleaseKV
from semipd_engine.core.request import Request
from semipd_engine.registry import Registry

Send = Callable[[str, Any], None]  # (peer worker name, message)


class Handoff:
    """Sender and receiver sides of one engine's hand-off; a worker uses the side of its role."""

    def __init__(self, name: str, pool: BlockPool, send: Send):
        self.name, self.pool, self.send = name, pool, send

    def hand_off(self, req: Request, target: str) -> None:
        raise NotImplementedError

    def handle(self, msg) -> bool:
        """A hand-off message for this worker; True when blocks changed hands here."""
        raise ValueError(f"{type(self).__name__} got unexpected message {type(msg).__name__}")

    def poll(self, report: Callable[[Any], None]) -> list[Request]:
        """Requests that became ready to adopt here since the last poll."""
        return []

    def abort(self, request_id: str) -> bool:
        """Forget an aborted request held by the hand-off; True when blocks were freed."""
        return False

    def arrived_aborted(self, msg) -> None:
        """A hand-off (AdoptRequest / OfferKV) arrived for a request aborted while in transit: release what it
        holds, here or at its sender."""

    @property
    def busy(self) -> bool:
        return False


class AdoptHandoff(Handoff):
    def hand_off(self, req: Request, target: str) -> None:
        self.send(target, AdoptRequest(req))  # same pool: the decode worker reads the blocks in place

    def arrived_aborted(self, msg) -> None:
        free_request(self.pool, msg.request)  # same pool: its blocks are freed here


class TransferHandoff(Handoff):
    def __init__(self, name: str, pool: BlockPool, send: Send, copy: Optional[Callable] = None):
        super().__init__(name, pool, send)
        # Prefill side: sent, not yet copied by the receiver, with the blocks it held when it left. (The
        # simulator's receiver holds the same request object and gives it new blocks when the copy starts.)
        self.held: dict[str, tuple[Request, list[int]]] = {}
        self.queue = TransferQueue(pool, copy) if copy is not None else None  # decode side

    def hand_off(self, req: Request, target: str) -> None:
        self.held[req.request_id] = (req, req.block_table)
        self.send(target, OfferKV(req, self.name))

    def handle(self, msg) -> bool:
        if isinstance(msg, OfferKV):
            self.queue.offer(msg.request, msg.source)
            return False
        if isinstance(msg, ReleaseKV):
            return self._free_held(msg.request_id)
        return super().handle(msg)

    def _free_held(self, request_id: str) -> bool:
        req, blocks = self.held.pop(request_id, (None, None))
        if req is None:
            return False
        pool = self.pool
        if pool.prefix_caching and block_pool.private_blocks(req):  # never registered: released as one run
            pool.release(req, blocks, min(req.num_computed_tokens // pool.block_size, len(blocks)))
        else:
            pool.free(blocks)
        if req.block_table is blocks:
            req.block_table = []
        return True

    def poll(self, report: Callable[[Any], None]) -> list[Request]:
        if self.queue is None:
            return []
        done = []
        for t, nbytes, seconds, cached in self.queue.pull():
            self.send(t.source, ReleaseKV(t.request.request_id))
            report(KVTransferred(self.name, nbytes, seconds, cached))
            done.append(t.request)
        return done

    def abort(self, request_id: str) -> bool:
        if self.queue is not None:
            waiting = self.queue.drop(request_id)
            if waiting is not None:
                self.send(waiting.source, ReleaseKV(request_id))
        return self._free_held(request_id)

    def arrived_aborted(self, msg) -> None:
        self.send(msg.source, ReleaseKV(msg.request.request_id))  # the blocks are the sender's to free

    @property
    def busy(self) -> bool:
        return bool(self.queue and self.queue.pending)


HANDOFFS: Registry[type[Handoff]] = Registry("hand-off", "WorkerSpec.handoff")
HANDOFFS.register("adopt", AdoptHandoff)
HANDOFFS.register("transfer", TransferHandoff)
