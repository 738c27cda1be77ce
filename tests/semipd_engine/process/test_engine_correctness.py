"""The engine's forward and greedy decoding equal transformers' on the same checkpoint."""

from __future__ import annotations

import pytest
import torch

from semipd_engine.core.request import Request, SamplingParams
from semipd_engine.runtime.factory import build_core
from tests.helpers import engine_cfg, hf_greedy, hf_model, model_cfg, prompts


def test_prefill_logits_match_transformers(hf_checkpoint):
    core = build_core(model_cfg(hf_checkpoint), engine_cfg())
    ps = prompts(core.executor.model.spec.vocab_size)
    reqs = [Request(f"r{i}", p, SamplingParams()) for i, p in enumerate(ps)]
    for r in reqs:
        r.block_table = core.pool.try_allocate(core.pool.blocks_needed(r.num_tokens, 0))
    ours = core.executor.prefill_logits([(r, r.num_tokens) for r in reqs])
    hf = hf_model(hf_checkpoint)
    row = 0
    for p in ps:
        with torch.no_grad():
            ref = hf(torch.tensor([p])).logits[0]
        torch.testing.assert_close(ours[row : row + len(p)], ref, atol=2e-4, rtol=1e-4)
        row += len(p)
    for r in reqs:
        core.pool.free(r.block_table)
    assert core.pool.num_used == 0


@pytest.mark.parametrize("policy", ["prefill_priority", "chunked"])
@pytest.mark.parametrize("num_kv_blocks", [256, 20], ids=["roomy", "preempting"])
def test_greedy_matches_transformers(hf_checkpoint, policy, num_kv_blocks):
    max_new = 24
    core = build_core(model_cfg(hf_checkpoint), engine_cfg(num_kv_blocks=num_kv_blocks, block_size=4,
                                                           max_num_batched_tokens=32, policy=policy))
    ps = prompts(core.executor.model.spec.vocab_size)
    outs = core.generate(ps, SamplingParams(max_tokens=max_new, temperature=0.0, ignore_eos=True))
    if num_kv_blocks == 20:
        assert core.scheduler.num_preemptions > 0, "the tiny pool should force preemption"
    for p, o in zip(ps, outs):
        assert o == hf_greedy(hf_checkpoint, p, max_new)
    assert core.pool.num_used == 0


@pytest.mark.parametrize("policy", ["prefill_priority", "chunked"])
@pytest.mark.parametrize("num_kv_blocks", [256, 18], ids=["roomy", "evicting"])
def test_a_cached_prefix_gives_the_same_greedy_output(hf_checkpoint, policy, num_kv_blocks):
    """Prompts that share a prefix with earlier ones compute only their tail, and say the same as transformers;
    in a pool too small to keep them, cached blocks are evicted and outputs stay right."""
    max_new = 12
    core = build_core(model_cfg(hf_checkpoint), engine_cfg(num_kv_blocks=num_kv_blocks, block_size=4,
                                                           max_num_batched_tokens=32, policy=policy))
    vocab = core.executor.model.spec.vocab_size
    base = prompts(vocab)[4]  # 48 tokens
    params = SamplingParams(max_tokens=max_new, temperature=0.0, ignore_eos=True)
    other = prompts(vocab, seed=2)[4]  # 48 other tokens: in the small pool, they need blocks base is cached in
    waves = [[base], [base[:30] + [11, 12, 13]], [base[:21] + [14], base[:21] + [15, 16, 17, 18, 19]], [other],
             [base]]
    cached = []
    for wave in waves:
        reqs = [Request(f"w{len(cached)}-{i}", p, params) for i, p in enumerate(wave)]
        for r in reqs:
            core.add_request(r)
        while core.has_work():
            core.step()
        for r, p in zip(reqs, wave):
            assert r.output_token_ids == hf_greedy(hf_checkpoint, p, max_new)
        cached.append([r.num_cached_tokens for r in reqs])
    if num_kv_blocks == 256:  # whole blocks of the shared prefix; a prompt's last token is always computed
        assert cached == [[0], [28], [20, 20], [0], [44]]
    else:
        assert cached[:3] == [[0], [28], [20, 20]] and cached[4][0] < 44  # `other` evicted part of base
    assert core.scheduler.prefix_hits == sum(map(sum, cached))
    assert core.pool.num_used == 0
