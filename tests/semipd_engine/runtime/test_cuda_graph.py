"""Decode CUDA graphs: buckets, padding and static buffers through the CPU stand-in; the real graphs on a GPU."""

from __future__ import annotations

import pytest
import torch

from semipd_engine.core.request import SamplingParams
from semipd_engine.runtime.cuda_graph import EagerGraphs, graph_batch_sizes
from semipd_engine.runtime.factory import build_core, build_state, decode_graphs
from tests.helpers import engine_cfg, hf_greedy, model_cfg, prompts


def test_bucket_sizes_follow_vllm():
    assert graph_batch_sizes(1) == (1,)
    assert graph_batch_sizes(6) == (1, 2, 4, 6)
    assert graph_batch_sizes(20) == (1, 2, 4, 8, 16, 20)
    assert graph_batch_sizes(32)[-3:] == (16, 24, 32)
    assert graph_batch_sizes(0) == ()


def _generate(ckpt, graphs_api, max_bs, device="cpu", max_tokens=12):
    mcfg = model_cfg(ckpt, device=device, cuda_graph_max_bs=max_bs, dtype="float32")
    ecfg = engine_cfg(num_kv_blocks=64, block_size=4, max_num_batched_tokens=256)
    state = build_state(mcfg, ecfg)
    if graphs_api is not None and state.kv.scratch_block is None:  # a CPU pool has no scratch block unless asked
        from semipd_engine.runtime.kv_cache import KVCache

        state.kv = KVCache(state.spec, state.kv.num_blocks, 4, state.kv.data.dtype, device, scratch=True)
    core = build_core(mcfg, ecfg, state=state)
    runner = core.executor
    if graphs_api is not None:
        runner.graphs = decode_graphs(mcfg, ecfg, state, core.max_model_len, api=graphs_api)
    ps = prompts(state.spec.vocab_size)
    # Different lengths: the decode batch shrinks through several buckets as requests finish.
    params = [SamplingParams(max_tokens=max_tokens - i, temperature=0.0, ignore_eos=True) for i in range(len(ps))]
    outs = core.generate(ps, params)
    return ps, outs, runner, state


def test_graphed_decodes_give_the_eager_tokens_and_leave_real_blocks_alone(llama_checkpoint):
    ps, eager, _, eager_state = _generate(llama_checkpoint, None, 0)
    api = EagerGraphs()
    _, graphed, runner, state = _generate(llama_checkpoint, api, 8)
    assert graphed == eager
    assert runner.graphs.replays > 0 and api.captured >= 3  # 6 requests finishing one by one: buckets 8, 4, 2, 1
    assert set(runner.graphs._graphs) == {1, 2, 4, 8}
    # Padded rows wrote only the scratch block: every block a request used holds the eager run's K/V.
    n = state.kv.num_blocks
    torch.testing.assert_close(state.kv.data[:, :, :n], eager_state.kv.data[:, :, :n])
    assert state.kv.data[:, :, n].abs().sum() > 0  # ...and they did write there
    assert graphed[0] == hf_greedy(llama_checkpoint, ps[0], 12)


def test_batches_past_the_largest_bucket_run_eagerly(llama_checkpoint):
    api = EagerGraphs()
    _, outs, runner, _ = _generate(llama_checkpoint, api, 2)
    _, eager, _, _ = _generate(llama_checkpoint, None, 0)
    assert outs == eager
    assert set(runner.graphs._graphs) <= {1, 2}
    assert runner.graphs.replays > 0


def test_no_graphs_on_cpu_or_when_eager_is_enforced(llama_checkpoint):
    mcfg, ecfg = model_cfg(llama_checkpoint), engine_cfg(num_kv_blocks=16, block_size=4)
    state = build_state(mcfg, ecfg)
    assert state.kv.scratch_block is None and decode_graphs(mcfg, ecfg, state, 64) is None
    assert build_core(mcfg, ecfg, state=state).executor.graphs is None


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_graphs_equal_eager_on_a_gpu(llama_checkpoint):
    from semipd_engine.runtime.cuda_graph import TorchCudaGraphs

    mcfg = model_cfg(llama_checkpoint, device="cuda", dtype="float32", cuda_graph_max_bs=8)
    ecfg = engine_cfg(num_kv_blocks=64, block_size=4, max_num_batched_tokens=256)
    graphed_core = build_core(mcfg, ecfg)
    assert graphed_core.executor.graphs is not None and isinstance(graphed_core.executor.graphs.api,
                                                                   TorchCudaGraphs)
    eager_core = build_core(model_cfg(llama_checkpoint, device="cuda", dtype="float32", enforce_eager=True), ecfg)
    assert eager_core.executor.graphs is None
    ps = prompts(graphed_core.executor.model.spec.vocab_size)
    params = [SamplingParams(max_tokens=12 - i, temperature=0.0, ignore_eos=True) for i in range(len(ps))]
    assert graphed_core.generate(ps, params) == eager_core.generate(ps, params)
    assert graphed_core.executor.graphs.replays > 0
