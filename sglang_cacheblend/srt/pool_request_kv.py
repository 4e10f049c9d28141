"""``RequestKV`` over SGLang's token pool: one request's KV, in the request's own slots.

The blended forward reads and writes the request's KV where SGLang keeps it, so decode and the
radix cache see exactly what a normal prefill would have left there; chunk KV is copied (and
RoPE-realigned) into those slots by :mod:`.layer_loader`, never read in place by a write.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from sglang_cacheblend.srt.sglang_decoder import SGLangDecoderOps

__all__ = ["PoolRequestKV"]


@dataclass
class PoolRequestKV:
    """One request's KV in SGLang's token pool: ``slots`` ``(kv_len,)`` by position.

    Positions ``0..prefix_len-1`` are the radix-cached prefix (read only); the request's new rows
    are ``slots[prefix_len:]``. ``ready(layer)``, when set, is called before any access to a
    layer: the layer pipeline's wait until that layer's chunk KV is in.
    """

    pool: Any
    ops: SGLangDecoderOps
    slots: torch.Tensor
    prefix_len: int
    ready: Callable[[int], None] | None = None

    @property
    def kv_len(self) -> int:
        return self.slots.numel()

    def _loc(self, rows: torch.Tensor) -> torch.Tensor:
        return self.slots[self.prefix_len + rows]

    def cached(self, layer: int, rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.ready is not None:
            self.ready(layer)
        loc = self._loc(rows)
        return self.pool.get_key_buffer(layer)[loc], self.pool.get_value_buffer(layer)[loc]

    def write(self, layer: int, rows: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        if self.ready is not None:
            self.ready(layer)
        self.pool.set_kv_buffer(self.ops.attention_layer(layer), self._loc(rows), k, v)

    def keys_values(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        if self.ready is not None:
            self.ready(layer)
        return self.pool.get_key_buffer(layer)[self.slots], self.pool.get_value_buffer(layer)[
            self.slots]
