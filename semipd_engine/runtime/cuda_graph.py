"""CUDA graphs for decode-only iterations, batch sizes bucketed (as vLLM and SGLang do).

A decode iteration of a small model on a GPU is bound by kernel launches: each layer launches a dozen kernels
for a few microseconds of work each. A CUDA graph records the whole forward once per batch size and replays it
with one launch. What a graph reads must sit at fixed addresses, so every input lives in a static buffer sized
for the largest bucket; a batch of n requests is padded to the next bucket B >= n, its rows copied in, the
graph replayed, and the first n rows of the output kept.

Padded rows must not touch a real request's KV: they write their K/V to the pool's scratch block
(`KVCache.scratch_block`, which no request is ever given) and attend to that one slot. Their outputs are
discarded. Prefills, mixed batches and batches larger than the largest bucket run eagerly. A bucket's graph is
captured at its first use, not at start-up: a worker's SM share is applied after its runner is built, and a
green-context switch drops the graphs (recorded on the old context) to be captured again on the new one.

The CUDA calls sit behind `GraphApi`; `EagerGraphs` stands in for them on a CPU (its "replay" runs the
function again on the same static buffers), so the padding, the bucket choice and the buffer copies are tested
everywhere, and the real graphs against eager execution in `gpu`-marked tests.
"""

from __future__ import annotations

import bisect
from collections.abc import Callable
from typing import Optional, Protocol

import torch

from semipd_engine.model.attention_metadata import AttentionMetadata


def graph_batch_sizes(max_bs: int) -> tuple[int, ...]:
    """1, 2, 4, then every multiple of 8 up to `max_bs` (and `max_bs` itself): vLLM's buckets."""
    if max_bs < 1:
        return ()
    sizes = {s for s in (1, 2, 4) if s <= max_bs} | set(range(8, max_bs + 1, 8)) | {max_bs}
    return tuple(sorted(sizes))


class GraphApi(Protocol):
    def capture(self, fn: Callable[[], torch.Tensor]) -> Callable[[], torch.Tensor]:
        """Record `fn` (which reads and writes only static tensors); the result replays it and returns its
        output tensor (the same tensor at every replay)."""
        ...


class TorchCudaGraphs:
    """torch.cuda.CUDAGraph, warmed up on a side stream first (torch's documented recipe); every graph shares one
    memory pool, so the buckets' graphs reuse one another's memory."""

    def __init__(self):
        self.pool = None

    def capture(self, fn):
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # lazy initialisations (cuBLAS handles, autotuning) happen outside the graph
            for _ in range(2):
                fn()
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool):
            out = fn()
        self.pool = graph.pool()

        def replay() -> torch.Tensor:
            graph.replay()
            return out

        return replay


class EagerGraphs:
    """A CPU stand-in: "capturing" keeps the function, a replay calls it on the static buffers again."""

    def __init__(self):
        self.captured = 0

    def capture(self, fn):
        self.captured += 1
        return fn


class DecodeGraphs:
    """One graph per bucket over shared static buffers; `run` returns None for a batch it does not take."""

    def __init__(self, model, kv_layers, device: torch.device, block_size: int, max_batch: int, max_blocks: int,
                 scratch_block: int, api: Optional[GraphApi] = None):
        self.model, self.kv_layers, self.device = model, kv_layers, device
        self.sizes = graph_batch_sizes(max_batch)
        self.block_size, self.max_blocks, self.scratch = block_size, max_blocks, scratch_block
        self.api = api if api is not None else TorchCudaGraphs()
        n = self.sizes[-1] if self.sizes else 0
        long = dict(dtype=torch.long, device=device)
        self.input_ids = torch.zeros(n, **long)
        self.positions = torch.zeros(n, **long)
        self.slot_blocks = torch.full((n,), scratch_block, **long)
        self.slot_offsets = torch.zeros(n, **long)
        self.block_tables = torch.full((n, max_blocks), scratch_block, **long)
        self.ctx_lens = torch.ones(n, **long)
        self.rows = torch.arange(n, **long)
        self._graphs: dict[int, Callable[[], torch.Tensor]] = {}
        self.replays = 0

    def bucket(self, n: int) -> Optional[int]:
        i = bisect.bisect_left(self.sizes, n)
        return self.sizes[i] if i < len(self.sizes) else None

    def invalidate(self) -> None:
        """Forget every graph (they are recaptured at their next use): after the worker's SM share changed, a
        graph recorded on the old green context must not replay."""
        self._graphs.clear()

    def _graph(self, size: int) -> Callable[[], torch.Tensor]:
        g = self._graphs.get(size)
        if g is None:
            meta = AttentionMetadata(slot_blocks=self.slot_blocks[:size], slot_offsets=self.slot_offsets[:size],
                                     prefills=[], decode_idx=self.rows[:size],
                                     decode_block_tables=self.block_tables[:size], decode_ctx_lens=self.ctx_lens[:size])
            ids, pos, layers, model = self.input_ids[:size], self.positions[:size], self.kv_layers, self.model
            g = self._graphs[size] = self.api.capture(lambda: model(ids, pos, meta, layers))
        return g

    def run(self, ids: list[int], positions: list[int], tables: list[list[int]]) -> Optional[torch.Tensor]:
        """Hidden states [n, hidden] of n decodes (token `ids[i]` at `positions[i]` over block table `tables[i]`),
        or None when no bucket takes the batch."""
        n = len(ids)
        size = self.bucket(n)
        if size is None or any(len(t) > self.max_blocks for t in tables):
            return None
        pad, scratch, bs = size - n, self.scratch, self.block_size
        # Built on the host and copied in with one transfer per buffer; every row up to the bucket is rewritten,
        # so a smaller batch never replays a larger one's stale rows.
        width = self.max_blocks
        table = torch.full((size, width), scratch, dtype=torch.long)
        for i, t in enumerate(tables):
            table[i, : len(t)] = torch.tensor(t, dtype=torch.long)
        blocks = [t[p // bs] for t, p in zip(tables, positions)] + [scratch] * pad
        offsets = [p % bs for p in positions] + [0] * pad
        self.input_ids[:size].copy_(torch.tensor(ids + [0] * pad), non_blocking=True)
        self.positions[:size].copy_(torch.tensor(positions + [0] * pad), non_blocking=True)
        self.slot_blocks[:size].copy_(torch.tensor(blocks), non_blocking=True)
        self.slot_offsets[:size].copy_(torch.tensor(offsets), non_blocking=True)
        self.block_tables[:size].copy_(table, non_blocking=True)
        self.ctx_lens[:size].copy_(torch.tensor([p + 1 for p in positions] + [1] * pad), non_blocking=True)
        out = self._graph(size)()
        self.replays += 1
        return out[:n]
