"""ModelRunner, the real executor: a scheduled batch -> packed tensors -> forward -> sampled tokens.

The runner owns the model and a view of the KV pool; it does not decide what
runs (the policy does) nor what a token means (the scheduler's update does).
The simulator's executor returns the same `ExecuteResult` from a cost model.
"""

from __future__ import annotations

import time
from typing import Optional

import torch

from semipd_engine.core.request import Request
from semipd_engine.core.scheduler import ExecuteResult, ScheduledBatch
from semipd_engine.model.attention_metadata import AttentionMetadata, PrefillSeq
from semipd_engine.runtime.cuda_graph import DecodeGraphs
from semipd_engine.runtime.kv_cache import KVCache
from semipd_engine.runtime.sampler import sample


class ModelRunner:
    def __init__(self, model, kv: KVCache, graphs: Optional[DecodeGraphs] = None):
        need = getattr(getattr(model, "attention_backend", None), "kv_layout", kv.layout)
        if need != kv.layout:
            raise ValueError(f"attention backend reads a {need!r} KV cache, the pool is {kv.layout!r}")
        self.model, self.kv = model, kv
        self.kv_layers = kv.layers()
        self.block_size = kv.block_size
        self.device = kv.data.device
        self.graphs = graphs  # decode-only batches replay a CUDA graph (runtime/cuda_graph.py); None: always eager

    def prepare(self, items: list[tuple[Request, int]]):
        bs = self.block_size
        ids: list[int] = []
        pos: list[int] = []
        slot_blocks: list[int] = []
        slot_offsets: list[int] = []
        prefills: list[PrefillSeq] = []
        decode_rows: list[int] = []
        decode_tables: list[list[int]] = []
        decode_lens: list[int] = []
        sample_rows: list[int] = []
        sample_reqs: list[Request] = []
        for req, n in items:
            start, end = req.num_computed_tokens, req.num_computed_tokens + n
            row0 = len(ids)
            ids += req.token_ids(start, end)
            table = req.block_table
            for p in range(start, end):
                pos.append(p)
                slot_blocks.append(table[p // bs])
                slot_offsets.append(p % bs)
            if n == 1:
                decode_rows.append(row0)
                decode_tables.append(table[: (end + bs - 1) // bs])
                decode_lens.append(end)
            else:
                prefills.append(PrefillSeq(row0, row0 + n, end,
                                           torch.tensor(table[: (end + bs - 1) // bs], device=self.device)))
            if end == req.num_tokens:  # reached the end of the known tokens: sample the next
                sample_rows.append(row0 + n - 1)
                sample_reqs.append(req)
        dev = self.device
        meta = AttentionMetadata(slot_blocks=torch.tensor(slot_blocks, device=dev),
                                 slot_offsets=torch.tensor(slot_offsets, device=dev), prefills=prefills)
        if decode_rows:
            width = max(len(t) for t in decode_tables)
            meta.decode_idx = torch.tensor(decode_rows, device=dev)
            meta.decode_block_tables = torch.tensor([t + [0] * (width - len(t)) for t in decode_tables], device=dev)
            meta.decode_ctx_lens = torch.tensor(decode_lens, device=dev)
        return torch.tensor(ids, device=dev), torch.tensor(pos, device=dev), meta, sample_rows, sample_reqs

    def execute(self, batch: ScheduledBatch) -> ExecuteResult:
        t0 = time.perf_counter()
        sampled = self.run(batch.items)
        return ExecuteResult(sampled, time.perf_counter() - t0)

    @torch.inference_mode()
    def run(self, items: list[tuple[Request, int]]) -> list[tuple[Request, int]]:
        """Run one iteration; returns (request, sampled token) for requests that reached their end."""
        hidden = self._graphed(items) if self.graphs is not None else None
        if hidden is not None:
            rows, reqs = list(range(len(items))), [req for req, _ in items]
        else:
            input_ids, positions, meta, rows, reqs = self.prepare(items)
            hidden = self.model(input_ids, positions, meta, self.kv_layers)
        if not rows:
            return []
        logits = self.model.compute_logits(hidden[torch.tensor(rows, device=self.device)])
        return list(zip(reqs, sample(logits, reqs)))

    def _graphed(self, items: list[tuple[Request, int]]) -> Optional[torch.Tensor]:
        """The batch's hidden states from a CUDA graph, if it is all decodes (one new token each, every one sampled)
        and a bucket takes it; else None (it runs eagerly)."""
        ids, pos, tables = [], [], []
        bs = self.block_size
        for req, n in items:
            end = req.num_computed_tokens + 1
            if n != 1 or end != req.num_tokens:
                return None
            ids.append(req.token_ids(end - 1, end)[0])
            pos.append(end - 1)
            tables.append(req.block_table[: (end + bs - 1) // bs])
        return self.graphs.run(ids, pos, tables)

    @torch.inference_mode()
    def prefill_logits(self, items: list[tuple[Request, int]]) -> torch.Tensor:
        """Logits of every new token (tests compare them with transformers)."""
        input_ids, positions, meta, _, _ = self.prepare(items)
        return self.model.compute_logits(self.model(input_ids, positions, meta, self.kv_layers))
