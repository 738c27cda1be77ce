"""The sampler computes every parameter combination the API accepts, on any logits, without NaN or errors."""

from __future__ import annotations

import random

import pytest
import torch

from semipd_engine.core.request import MIN_TEMPERATURE, Request, SamplingParams
from semipd_engine.runtime.sampler import sample
from semipd_engine.serving.protocol import ApiError, parse_sampling

# Values at the edges of what the API's ranges admit, mixed with ordinary ones.
TEMPERATURES = [0.0, 5e-324, 1e-300, 1e-45, 1e-40, 1e-38, 1e-30, 1e-10, MIN_TEMPERATURE / 2, MIN_TEMPERATURE,
                1e-4, 0.01, 0.7, 1.0, 2.0]
TOP_PS = [1e-9, 1e-6, 0.01, 0.5, 0.9, 0.999999, 1.0]
SEEDS = [None, 0, 1, -1, 2**31, 2**63 - 1, 2**63, -(2**63), 2**64 - 1]


def _api_body(rng: random.Random, vocab: int) -> dict:
    body = {"max_tokens": rng.randint(1, 8)}
    r = rng.random()
    body["temperature"] = rng.choice(TEMPERATURES) if r < 0.7 else rng.uniform(0, 2)
    if rng.random() < 0.6:
        body["top_p"] = rng.choice(TOP_PS) if rng.random() < 0.7 else rng.uniform(1e-9, 1)
    if rng.random() < 0.6:
        body["top_k"] = rng.choice([-1, 1, 2, max(1, vocab - 1), vocab, vocab + 1, 10**9, rng.randint(1, 3 * vocab)])
    if rng.random() < 0.7:
        body["seed"] = rng.choice(SEEDS) if rng.random() < 0.6 else rng.randint(-(2**63), 2**64 - 1)
    return body


def _logits(rng: random.Random, gen: torch.Generator, batch: int, vocab: int) -> torch.Tensor:
    kind = rng.choice(["normal", "huge", "extreme", "masked", "nonfinite", "flat", "spike"])
    x = torch.randn(batch, vocab, generator=gen)
    if kind == "huge":
        x *= 1e30
    elif kind == "extreme":
        x = torch.where(x > 0, torch.tensor(3.4e38), torch.tensor(-3.4e38))
    elif kind == "masked":  # most of the vocabulary masked off, sometimes all of a row
        x[torch.rand(batch, vocab, generator=gen) < 0.9] = float("-inf")
        if rng.random() < 0.3:
            x[0] = float("-inf")
    elif kind == "nonfinite":  # what a numerically broken forward pass would hand over
        x[torch.rand(batch, vocab, generator=gen) < 0.2] = float("nan")
        x[torch.rand(batch, vocab, generator=gen) < 0.05] = float("inf")
        if rng.random() < 0.3:
            x[-1] = float("nan")
    elif kind == "flat":
        x = torch.zeros(batch, vocab)
    elif kind == "spike":
        x[:, rng.randrange(vocab)] = 1e4
    return x


def test_random_api_parameters_on_random_logits_never_fail():
    rng = random.Random(1234)
    gen = torch.Generator().manual_seed(1234)
    for _ in range(1500):
        vocab = rng.choice([1, 2, 3, 17, 256, 4096])
        batch = rng.randint(1, 4)
        params = []
        for _ in range(batch):
            body = _api_body(rng, vocab)
            p, _, _ = parse_sampling(body, prompt_len=4, max_model_len=64)
            params.append(p)
        reqs = [Request(f"r{i}", [1, 2, 3, 4], p) for i, p in enumerate(params)]
        logits = _logits(rng, gen, batch, vocab)
        # twice: the second draw continues from the generator state the first one saved
        for _ in range(2):
            tokens = sample(logits.clone(), reqs)
            assert len(tokens) == batch
            for t, row in zip(tokens, logits):
                assert isinstance(t, int) and 0 <= t < vocab
                if bool(torch.isfinite(row).any() or torch.isposinf(row).any()):
                    assert not torch.isnan(row[t]) and row[t] != float("-inf"), "sampled a masked or NaN token"


def test_below_the_temperature_floor_is_greedy_and_seeds_are_reproducible():
    for t in (1e-40, 1e-38, 1e-6):
        p, _, _ = parse_sampling({"temperature": t, "seed": 5}, 4, 64)
        assert p.temperature == 0.0 and p.greedy
    logits = torch.randn(1, 1000, generator=torch.Generator().manual_seed(0))
    req = Request("r", [1], SamplingParams(temperature=1e-40))
    assert sample(logits, [req]) == [int(logits.argmax())]
    # a just-above-floor temperature is (nearly) greedy too, and never NaN
    req = Request("r", [1], SamplingParams(temperature=MIN_TEMPERATURE, seed=3))
    assert sample(logits, [req]) == [int(logits.argmax())]

    def draws(seed):
        req = Request("r", [1], SamplingParams(temperature=1.0, seed=seed))
        return [sample(logits, [req])[0] for _ in range(20)]

    for seed in (2**64 - 1, -(2**63), 0):
        assert draws(seed) == draws(seed)
    # the sampler itself reduces out-of-range seeds instead of overflowing the generator
    assert draws(2**64 + 7) == draws(7) and draws(-(2**63) - 1) == draws(2**64 - 2**63 - 1)


@pytest.mark.parametrize("seed", [2**64, -(2**63) - 1, 18446744073709551616, -9223372036854775809])
def test_api_rejects_seeds_outside_the_generator_range(seed):
    with pytest.raises(ApiError) as e:
        parse_sampling({"temperature": 1.0, "seed": seed}, 4, 64)
    assert e.value.param == "seed" and e.value.status == 400


def test_temperature_nan_and_inf_are_rejected():
    for t in (float("nan"), float("inf"), -0.0 - 1e-300, 2.0000001):
        with pytest.raises(ApiError):
            parse_sampling({"temperature": t}, 4, 64)
