"""Token sampling: greedy, temperature, top-k, top-p, per-request seeds.

Whatever the parameters and the logits, `sample` returns one valid token id per
row and never raises on numbers: temperatures below `MIN_TEMPERATURE` are greedy,
seeds are reduced to the generator's 64-bit range, non-finite logits are tamed
(NaN never wins, +inf is the largest float), and a row whose distribution still
cannot be sampled falls back to its argmax.
"""

from __future__ import annotations

import secrets

import torch

from semipd_engine.core.request import MIN_TEMPERATURE, SEED_MODULUS, Request

_FMAX = torch.finfo(torch.float32).max


def _generator(req: Request) -> torch.Generator:
    g = torch.Generator()
    if req.rng_state is None:
        seed = req.params.seed if req.params.seed is not None else secrets.randbits(63)
        g.manual_seed(seed % SEED_MODULUS)  # manual_seed overflows outside [-2**63, 2**64)
    else:
        g.set_state(torch.frombuffer(bytearray(req.rng_state), dtype=torch.uint8))
    return g


def _finite(row: torch.Tensor) -> torch.Tensor:
    """NaN -> -inf (never chosen), +inf -> the largest float (so max - max is 0, not NaN)."""
    return torch.nan_to_num(row, nan=float("-inf"), posinf=_FMAX, neginf=float("-inf"))


def _argmax(row: torch.Tensor) -> int:
    row = _finite(row.float())
    return int(row.argmax()) if bool(torch.isfinite(row).any()) else 0


def _probs(row: torch.Tensor, temperature: float, top_k: int, top_p: float) -> torch.Tensor | None:
    """The distribution to sample from, or None when there is none (every logit -inf or NaN)."""
    row = _finite(row.float())
    if not bool(torch.isfinite(row).any()):
        return None
    # Subtract the max first: scaling by 1/T then cannot overflow to inf - inf.
    row = _finite((row - row.max()) / max(temperature, MIN_TEMPERATURE))
    if 0 < top_k < row.numel():
        kth = torch.topk(row, top_k).values[-1]
        row = row.masked_fill(row < kth, float("-inf"))
    probs = torch.softmax(row, dim=-1)
    if top_p < 1.0:
        sorted_p, idx = probs.sort(descending=True)
        # keep the smallest prefix whose mass reaches top_p (always >= 1 token)
        drop = sorted_p.cumsum(0) - sorted_p > top_p
        sorted_p[drop] = 0.0
        probs = torch.zeros_like(probs).scatter_(0, idx, sorted_p)
    if not bool(torch.isfinite(probs).all()) or not float(probs.sum()) > 0.0:
        return None
    return probs


def sample(logits: torch.Tensor, requests: list[Request]) -> list[int]:
    """One token per row of ``logits`` [B, vocab] (float32)."""
    if all(r.params.greedy for r in requests):
        if bool(torch.isfinite(logits).all()):
            return logits.argmax(dim=-1).tolist()
        return [_argmax(row) for row in logits.cpu()]
    logits = logits.cpu()  # per-request seeded generators are CPU generators
    out = []
    for i, req in enumerate(requests):
        p = req.params
        if p.greedy:
            out.append(_argmax(logits[i]))
            continue
        probs = _probs(logits[i], p.temperature, p.top_k, p.top_p)
        g = _generator(req)
        out.append(int(torch.multinomial(probs, 1, generator=g)) if probs is not None else _argmax(logits[i]))
        req.rng_state = g.get_state().numpy().tobytes()  # bytes: cheap to hand between workers
    return out
