"""``KVStore`` over SGLang's token pool: one request's KV, in the request's own slots.

The blended forward reads and writes the request's KV where SGLang keeps it, so decode and the
radix cache see exactly what a normal prefill would have left there; chunk KV is copied (and
RoPE-realigned) into those slots, never read in place by a write.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from sglang_cacheblend.blend.realign import realign_keys_inplace

if TYPE_CHECKING:
    from sglang_cacheblend.blend.rotary_config import RotaryConfig
    from sglang_cacheblend.srt.blend_request import ChunkHit
    from sglang_cacheblend.srt.sglang_decoder import SGLangDecoderOps

__all__ = ["PoolKVStore"]


@dataclass
class PoolKVStore:
    """One request's KV in SGLang's token pool: ``slots`` ``(kv_len,)`` by position.

    Positions ``0..prefix_len-1`` are the radix-cached prefix (read only); the request's new rows
    are ``slots[prefix_len:]``.
    """

    pool: Any
    ops: SGLangDecoderOps
    slots: torch.Tensor
    prefix_len: int

    @property
    def kv_len(self) -> int:
        return self.slots.numel()

    def _loc(self, rows: torch.Tensor) -> torch.Tensor:
        return self.slots[self.prefix_len + rows]

    def cached(self, layer: int, rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        loc = self._loc(rows)
        return self.pool.get_key_buffer(layer)[loc], self.pool.get_value_buffer(layer)[loc]

    def write(self, layer: int, rows: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        self.pool.set_kv_buffer(self.ops.attention_layer(layer), self._loc(rows), k, v)

    def keys_values(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.pool.get_key_buffer(layer)[self.slots], self.pool.get_value_buffer(layer)[
            self.slots]

    def seed_chunks(self, hits: list[ChunkHit], rotary: RotaryConfig) -> torch.Tensor:
        """Copy the chunks' KV into this request's slots, K realigned to their new positions.

        Returns the reuse mask over the new rows (True where a chunk's KV now sits). A span the
        radix prefix already holds is skipped (exact KV beats reused KV). All chunks move
        together, one gather, rotation and scatter per layer: per chunk and layer, the small
        copies and rotations took a fifth of a blended prefill's time in the server. The
        chunks' own slots are only read: cached chunk KV is never modified in place.
        """
        mask = torch.zeros(self.kv_len - self.prefix_len, dtype=torch.bool)
        src, dst, old, new = [], [], [], []
        for hit in hits:
            start = max(hit.start, self.prefix_len)
            if start >= hit.end:
                continue
            skip = start - hit.start
            src.append(hit.kv_loc[skip:].to(self.slots.device))
            dst.append(self.slots[start:hit.end])
            old.append(hit.positions[skip:].to(torch.int64))
            new.append(torch.arange(start, hit.end))
            mask[start - self.prefix_len: hit.end - self.prefix_len] = True
        if not src:
            return mask
        src_loc, dst_loc = torch.cat(src), torch.cat(dst)
        old_pos, new_pos = torch.cat(old), torch.cat(new)
        device = self.pool.get_key_buffer(0).device
        old_pos, new_pos = old_pos.to(device), new_pos.to(device)
        for layer in range(self.ops.num_layers):
            k_buf = self.pool.get_key_buffer(layer)
            v_buf = self.pool.get_value_buffer(layer)
            keys = k_buf[src_loc]  # a gathered copy: rotate it in place
            realign_keys_inplace(keys, old_pos, new_pos, rotary)
            k_buf[dst_loc] = keys
            v_buf[dst_loc] = v_buf[src_loc]
        return mask
