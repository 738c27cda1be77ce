"""Build what a real engine runs on, in one place for every engine.

`build_state` loads the weights and allocates the KV tensor and its allocator
(shared-memory variants for engines whose processes share them); `build_core`
puts a policy and a model runner on top. The unified engine's worker, semi-PD's
resident owner and each disaggregated instance all go through here, so the KV
sizing rule exists once.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Optional

from semipd_engine.core.block_pool import BlockPool
from semipd_engine.core.clock import WALL, Clock
from semipd_engine.core.engine_core import EngineCore
from semipd_engine.core.policies import make_scheduler
from semipd_engine.model import load_weights, resolve
from semipd_engine.model.loader import build_model, torch_dtype
from semipd_engine.model.spec import ModelSpec
from semipd_engine.runtime.cuda_graph import DecodeGraphs
from semipd_engine.runtime.kv_cache import KVCache, SharedBlockPool
from semipd_engine.runtime.runner import ModelRunner
from semipd_engine.serving.tokenizer import stop_token_ids

log = logging.getLogger(__name__)


@dataclass
class ModelState:
    """The memory a model runs on: weights, the KV tensor and its allocator (None where not built)."""

    spec: ModelSpec
    eos_token_ids: tuple[int, ...]
    model: Any = None
    kv: Optional[KVCache] = None
    pool: Optional[BlockPool] = None


def num_kv_blocks(spec: ModelSpec, model_cfg, engine_cfg, fraction: float = 1.0) -> int:
    """Blocks of the KV pool: `engine.num_kv_blocks`, else what `engine.kv_cache_mb` holds; times `fraction`."""
    total = engine_cfg.num_kv_blocks or KVCache.blocks_for_memory(
        spec, engine_cfg.block_size, torch_dtype(model_cfg.dtype, model_cfg.device), engine_cfg.kv_cache_mb)
    return max(1, int(total * fraction))


def build_state(model_cfg, engine_cfg, *, weights: bool = True, kv_blocks: Optional[int] = None,
                lock=None, share: bool = False) -> ModelState:
    """Weights (if asked), a KV pool of `kv_blocks` (default: the config's size) and its allocator.

    `share` puts weights and KV in shared memory for other processes; a `lock` makes
    the allocator a `SharedBlockPool` that several processes can allocate from.
    """
    loaded = resolve(model_cfg)
    spec = loaded.spec
    dtype = torch_dtype(model_cfg.dtype, model_cfg.device)
    state = ModelState(spec, stop_token_ids(loaded.tokenizer, spec.eos_token_ids))
    if weights:
        state.model = load_model(model_cfg, spec)
        if share:
            state.model.share_memory()
    blocks = kv_blocks or num_kv_blocks(spec, model_cfg, engine_cfg)
    state.kv = KVCache(spec, blocks, engine_cfg.block_size, dtype, model_cfg.device, share=share)
    if lock is not None:
        state.pool = SharedBlockPool(blocks, engine_cfg.block_size, engine_cfg.watermark, lock,
                                     engine_cfg.enable_prefix_caching)
    else:
        state.pool = BlockPool(blocks, engine_cfg.block_size, engine_cfg.watermark, engine_cfg.enable_prefix_caching)
    return state


def load_model(model_cfg, spec: ModelSpec):
    return build_model(spec, load_weights(model_cfg, spec), torch_dtype(model_cfg.dtype, model_cfg.device),
                       model_cfg.attention_backend, model_cfg.device)


def max_model_len(spec: ModelSpec, model_cfg, pool: BlockPool) -> int:
    limit = model_cfg.max_model_len or spec.max_position_embeddings
    # A lone request must always fit in the pool, or preemption could not make progress.
    capacity = (pool.num_blocks - pool.watermark_blocks) * pool.block_size
    if capacity < limit:
        log.warning("KV pool holds %d tokens < max_model_len %d: capping", capacity, limit)
    return min(limit, capacity, spec.max_position_embeddings)


def build_core(model_cfg, engine_cfg, policy: Optional[str] = None, state: Optional[ModelState] = None,
               clock: Clock = WALL) -> EngineCore:
    """An engine core running `policy` (default `engine.policy`) over `state` (default: built here).

    A state from elsewhere may lack pieces (disaggregated instances get only their
    KV pool, and load their own weights): what is missing is built here.
    """
    if state is None:
        state = build_state(model_cfg, engine_cfg)
    if state.model is None:
        state.model = load_model(model_cfg, state.spec)
    if state.pool is None:
        state.pool = BlockPool(state.kv.num_blocks, state.kv.block_size, engine_cfg.watermark,
                               engine_cfg.enable_prefix_caching)
    limit = max_model_len(state.spec, model_cfg, state.pool)
    scheduler = make_scheduler(policy or engine_cfg.policy, state.pool, engine_cfg, limit)
    return EngineCore(scheduler, ModelRunner(state.model, state.kv, decode_graphs(model_cfg, engine_cfg, state, limit)),
                      clock, state.eos_token_ids)


def decode_graphs(model_cfg, engine_cfg, state: ModelState, limit: int, api=None) -> Optional[DecodeGraphs]:
    """CUDA graphs for the runner's decode batches, where they can run (CUDA, a scratch block, not eager)."""
    kv = state.kv
    if api is None and (kv.data.device.type != "cuda" or model_cfg.enforce_eager):
        return None
    if kv.scratch_block is None:
        return None
    max_bs = min(model_cfg.cuda_graph_max_bs, engine_cfg.max_num_seqs)
    return DecodeGraphs(state.model, kv.layers(), kv.data.device, kv.block_size, max_bs,
                        -(-limit // kv.block_size), kv.scratch_block, api)
