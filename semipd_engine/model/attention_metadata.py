"""What a packed batch tells every attention backend: where each new token's K/V goes in the pool and how each
sequence reads its context back (its own module, so a backend imports it without importing the others)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch


@dataclass
class PrefillSeq:
    start: int  # slice of the packed batch
    end: int
    ctx_len: int  # tokens of context after this step (cached + new)
    block_ids: torch.Tensor  # the sequence's blocks covering ctx_len

    @property
    def fresh(self) -> bool:
        # No earlier context in the cache: attend to the new K/V directly.
        return self.ctx_len == self.end - self.start


@dataclass
class AttentionMetadata:
    slot_blocks: torch.Tensor  # [T] block of each new token's K/V
    slot_offsets: torch.Tensor  # [T] its offset inside the block
    prefills: list[PrefillSeq]
    decode_idx: Optional[torch.Tensor] = None  # [B] positions in the packed batch
    decode_block_tables: Optional[torch.Tensor] = None  # [B, max_blocks], padded with 0
    decode_ctx_lens: Optional[torch.Tensor] = None  # [B]
