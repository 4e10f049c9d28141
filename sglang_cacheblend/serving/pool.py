"""What the scheduler side needs to know of SGLang, as plain Python: the pool and the request.

:mod:`sglang_cacheblend.serving` decides everything about a chunked request without importing
SGLang; the ``cacheblend`` radix cache (:mod:`sglang_cacheblend.srt.radix_cache`) adapts SGLang's
token-to-KV allocator to :class:`ChunkPool` and a scheduler ``Req`` to a :class:`RequestView`.
The tests run the same logic on a fake pool.
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import torch

__all__ = ["ChunkPool", "RequestView"]


class ChunkPool(Protocol):
    """Slots of the token-to-KV pool, as admission and the hand-off use them."""

    def alloc(self, num_tokens: int) -> torch.Tensor | None:
        """``num_tokens`` fresh slots, evicting unlocked KV first when the pool is short;
        None when even that does not free enough. The caller has checked the admission
        budget."""

    def free(self, kv_loc: torch.Tensor) -> None:
        """Give slots back to the pool."""

    def kv_cache(self) -> Any:
        """The per-layer K/V buffers (``get_key_buffer(layer)``, ``layer_num``...)."""


@dataclass(frozen=True)
class RequestView:
    """One scheduler request as admission reads it, taken when it is read.

    ``prompt_ids`` is the prompt SGLang will actually run (after any abort stub or
    truncation); ``ending`` says SGLang will finish the request without serving its prompt (an
    abort pending); ``retracted`` that it is being prefilled again after retraction;
    ``extend_end`` where its next extend ends (None: at the prompt's end).
    """

    rid: Hashable
    prompt_ids: Sequence[int]
    prefix_len: int = 0
    cache_salt: str | None = None
    extra_key: str | None = None
    ending: bool = False
    retracted: bool = False
    extend_end: int | None = None
