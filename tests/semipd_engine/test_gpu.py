"""CUDA paths (run with `pytest -m gpu` on a machine with a GPU; skipped elsewhere)."""

from __future__ import annotations

import pytest
import torch

from semipd_engine.core.request import SamplingParams
from semipd_engine.runtime.factory import build_core
from tests.helpers import engine_cfg, hf_greedy, model_cfg, prompts

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]


@pytest.mark.parametrize("policy", ["prefill_priority", "chunked"])
def test_greedy_on_cuda_matches_transformers(llama_checkpoint, policy):
    core = build_core(model_cfg(llama_checkpoint, device="cuda"),
                      engine_cfg(policy=policy, num_kv_blocks=64, block_size=4, max_num_batched_tokens=32))
    assert core.executor.kv.data.is_cuda
    ps = prompts(core.executor.model.spec.vocab_size)
    outs = core.generate(ps, SamplingParams(max_tokens=16, temperature=0.0, ignore_eos=True))
    for p, o in zip(ps, outs):
        assert o == hf_greedy(llama_checkpoint, p, 16)
    assert core.pool.num_used == 0
