"""What the scheduler side tells the model about one blended request.

The ``cacheblend`` radix cache decides, per request, which chunk spans of the prompt hit cached
chunk KV (and locks them); the model reads that decision when the request's extend runs. The
link is explicit: the cache factory hands itself to the model (``attach_blend_source``), and the
model asks it by request id. Nothing here imports SGLang.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch

from sglang_cacheblend.config import BlendConfig


@dataclass(frozen=True)
class ChunkHit:
    """A prompt span ``[start, end)`` whose KV lies in pool slots ``kv_loc``.

    ``kv_loc`` ``(end - start,)`` int64 are slots owned by the chunk index (read only: the
    request copies them into its own slots); ``positions`` ``(end - start,)`` int64 are the
    positions that KV was computed at.
    """

    start: int
    end: int
    kv_loc: torch.Tensor
    positions: torch.Tensor

    def __post_init__(self) -> None:
        n = self.end - self.start
        if n <= 0 or self.kv_loc.shape != (n,) or self.positions.shape != (n,):
            raise ValueError(
                f"ChunkHit [{self.start}, {self.end}) needs kv_loc and positions of shape ({n},),"
                f" got {tuple(self.kv_loc.shape)} and {tuple(self.positions.shape)}"
            )


@dataclass(frozen=True)
class BlendRequest:
    """The chunk hits of one request (sorted, disjoint) and the config to blend them with."""

    hits: tuple[ChunkHit, ...]
    config: BlendConfig

    @property
    def reused_tokens(self) -> int:
        return sum(hit.end - hit.start for hit in self.hits)


class BlendRequestSource(Protocol):
    def blend_request(self, rid: str) -> BlendRequest | None:
        """The request's blend decision, or None to prefill it normally."""
