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
