"""KV transfers into a pool with a prefix cache: only the blocks the receiver lacks are copied."""

from __future__ import annotations

from semipd_engine.core.block_pool import BlockPool
from semipd_engine.core.kv_transfer import TransferQueue
from semipd_engine.core.request import Request, SamplingParams


def _prefilled(rid: str, tokens: list[int], src: BlockPool) -> Request:
    """A request whose prompt the prefill instance computed, in blocks of `src`."""
    r = Request(rid, list(tokens), SamplingParams(max_tokens=4, temperature=0.0))
    r.block_table = src.try_allocate(src.blocks_needed(len(tokens), 0))
    r.num_computed_tokens = len(tokens)
    r.output_token_ids.append(1)  # sampled by the prefill iteration, not yet computed
    return r


def test_a_transfer_copies_only_the_blocks_the_receiver_holds_no_cached_copy_of():
    src, dst = BlockPool(32, 4, prefix_caching=True), BlockPool(32, 4, prefix_caching=True)
    copied: list[tuple[list[int], list[int]]] = []

    def copy(t, blocks):
        copied.append((list(t.src_blocks), list(blocks)))
        return 10 * len(blocks), 0.0

    q = TransferQueue(dst, copy)
    first = _prefilled("a", list(range(100, 110)), src)  # 2 full blocks + 2 tokens
    sent = list(first.block_table)
    q.offer(first, "p")
    [(_, nbytes, _, cached)] = q.pull()
    assert (nbytes, cached) == (30, 0) and copied[-1] == (sent, first.block_table)
    assert dst.num_cached == 2  # the full blocks it received are cached where they now are
    # a next turn: the same 10 tokens and 6 more; its first two blocks are in the receiver already
    second = _prefilled("b", list(range(100, 116)), src)
    sent = list(second.block_table)
    q.offer(second, "p")
    [(_, nbytes, _, cached)] = q.pull()
    assert (nbytes, cached) == (20, 2)
    assert copied[-1] == (sent[2:], second.block_table[2:]) and second.block_table[:2] == first.block_table[:2]
    assert second.num_registered_blocks == 4 and dst.num_cached == 4
    dst.free(first.block_table)
    dst.free(second.block_table)
    assert dst.num_used == 0  # every reference the hits took is given back
    # without a cache every block is copied
    plain = TransferQueue(BlockPool(32, 4), copy)
    plain.offer(_prefilled("c", list(range(100, 116)), src), "p")
    assert plain.pull()[0][1:] == (40, 0.0, 0)

