"""Token sampling: greedy, temperature, top-k, top-p, per-request seeds."""

from __future__ import annotations

import secrets

import torch

from semipd_engine.request import Request


def _generator(req: Request) -> torch.Generator:
    g = torch.Generator()
    if req.rng_state is None:
        seed = req.params.seed if req.params.seed is not None else secrets.randbits(63)
        g.manual_seed(seed)
    else:
        g.set_state(torch.frombuffer(bytearray(req.rng_state), dtype=torch.uint8))
    return g


def sample(logits: torch.Tensor, requests: list[Request]) -> list[int]:
    """One token per row of ``logits`` [B, vocab] (float32)."""
    if all(r.params.greedy for r in requests):
        return logits.argmax(dim=-1).tolist()
    logits = logits.cpu()  # per-request seeded generators are CPU generators
    out = []
    greedy = logits.argmax(dim=-1).tolist()
    for i, req in enumerate(requests):
        p = req.params
        if p.greedy:
            out.append(greedy[i])
            continue
        row = logits[i] / p.temperature
        if p.top_k > 0:
            kth = torch.topk(row, min(p.top_k, row.numel())).values[-1]
            row = row.masked_fill(row < kth, float("-inf"))
        probs = torch.softmax(row, dim=-1)
        if p.top_p < 1.0:
            sorted_p, idx = probs.sort(descending=True)
            # keep the smallest prefix whose mass reaches top_p (always >= 1 token)
            drop = sorted_p.cumsum(0) - sorted_p > p.top_p
            sorted_p[drop] = 0.0
            probs = torch.zeros_like(probs).scatter_(0, idx, sorted_p)
        g = _generator(req)
        out.append(int(torch.multinomial(probs, 1, generator=g)))
        req.rng_state = g.get_state().numpy().tobytes()  # bytes: cheap to hand between workers
    return out
