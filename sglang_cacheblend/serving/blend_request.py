"""What the scheduler side tells the model about one blended request.

Admission (:mod:`.admission`) decides, per request, which chunk spans of the prompt hit cached
chunk KV (and locks them); the model reads that decision when the request's extend runs, and
reports back one :class:`BlendOutcome` per blended request. The link is explicit: the cache
factory hands admission to the model (``attach_blend_source``), and the model asks it by request
id (:class:`BlendSource`). Nothing here imports SGLang.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch

from sglang_cacheblend.config import BlendConfig
from sglang_cacheblend.store.entry import ChunkKV


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


@dataclass(frozen=True, eq=False)
class ContextPrefix:
    """What a request's missed chunks are computed after on a server with a chunk context
    (``--cacheblend-chunk-context``): the sink plus the context, at positions ``0..``.

    Shared by every miss of the request and computed once per server: ``ready`` means
    ``kv_loc`` are a locked chunk-index entry's slots holding its KV (read only); otherwise
    they are fresh slots the model fills first, and admission then hands them to the index.
    """

    token_ids: torch.Tensor  # (n,) int64, CPU: the sink, then the context
    kv_loc: torch.Tensor  # (n,) int64
    ready: bool

    def __post_init__(self) -> None:
        n = self.token_ids.numel()
        if n == 0 or self.token_ids.shape != (n,) or self.kv_loc.shape != (n,):
            raise ValueError("ContextPrefix needs token_ids and kv_loc of one shape (n,), n > 0")


@dataclass(frozen=True, eq=False)
class ChunkMiss:
    """A prompt span ``[start, end)`` whose chunk was not cached: computed on its own first.

    Standalone: the model runs ``sink_ids + token_ids`` at positions ``0..`` into
    ``sink_loc + kv_loc`` (fresh slots the cache allocated). After a chunk ``context``: the
    model runs ``token_ids`` after the context's KV, at the positions that follow it, into
    ``kv_loc`` (no sink of its own). Then it is reused like a hit and handed to the index.
    """

    start: int
    end: int
    token_ids: torch.Tensor  # (end - start,) int64, CPU
    sink_ids: tuple[int, ...]
    sink_loc: torch.Tensor  # (len(sink_ids),) int64
    kv_loc: torch.Tensor  # (end - start,) int64
    context: ContextPrefix | None = None

    def __post_init__(self) -> None:
        n = self.end - self.start
        if n <= 0 or self.token_ids.shape != (n,) or self.kv_loc.shape != (n,):
            raise ValueError(f"ChunkMiss [{self.start}, {self.end}) needs token_ids and kv_loc "
                             f"of shape ({n},)")
        if self.context is not None:
            if self.sink_ids or self.sink_loc.numel():
                raise ValueError("a ChunkMiss after a context has no sink of its own")
        elif not self.sink_ids or self.sink_loc.shape != (len(self.sink_ids),):
            raise ValueError("ChunkMiss needs one sink slot per sink token (at least one)")

    @property
    def prefix_len(self) -> int:
        """Tokens the chunk KV is computed after (the sink, or the sink and the context)."""
        return len(self.sink_ids) if self.context is None else self.context.token_ids.numel()

    @property
    def positions(self) -> torch.Tensor:
        """Positions the chunk KV is computed at (right after the sink or the context)."""
        offset = self.prefix_len
        return torch.arange(offset, offset + self.end - self.start)


@dataclass(frozen=True, eq=False)
class ChunkLoad:
    """A prompt span ``[start, end)`` whose chunk KV was found below the pool (``tier``).

    ``kv`` (CPU, every layer) is written into ``kv_loc``, fresh slots the cache allocated, layer
    by layer during the forward; then it is reused like a hit and handed to the index.
    """

    start: int
    end: int
    token_ids: torch.Tensor  # (end - start,) int64, CPU
    kv_loc: torch.Tensor  # (end - start,) int64
    kv: ChunkKV
    tier: str

    def __post_init__(self) -> None:
        n = self.end - self.start
        if n <= 0 or self.token_ids.shape != (n,) or self.kv_loc.shape != (n,) or (
                self.kv.k.shape[1] != n):
            raise ValueError(f"ChunkLoad [{self.start}, {self.end}) needs token_ids, kv_loc "
                             f"and KV of {n} tokens")

    @property
    def positions(self) -> torch.Tensor:
        """Positions the stored keys were rotated at."""
        return self.kv.positions

    def as_hit(self) -> ChunkHit:
        return ChunkHit(self.start, self.end, self.kv_loc, self.kv.positions)


@dataclass(frozen=True)
class BlendRequest:
    """One request's blend: chunk hits and misses (sorted, disjoint) and the config.

    ``prompt_len`` is the request's prompt length: the blend runs only in an extend that ends
    at the prompt's end (a chunked prefill that splits the prompt is prefilled normally).
    """

    hits: tuple[ChunkHit, ...]
    config: BlendConfig
    misses: tuple[ChunkMiss, ...] = ()
    prompt_len: int | None = None
    loads: tuple[ChunkLoad, ...] = ()
    context: ContextPrefix | None = None  # what the misses are computed after, if a context

    @property
    def reused_tokens(self) -> int:
        """Tokens whose KV comes from chunk KV (cached, loaded, or computed standalone now)."""
        return sum(c.end - c.start for c in (*self.hits, *self.misses, *self.loads))


@dataclass(frozen=True)
class BlendOutcome:
    """What one extend forward did with a request's :class:`BlendRequest`.

    ``reason`` is "" when the request was blended, else why not (it was prefilled in full).
    A blended forward lists the KV it left in fresh slots for the index: the chunk ``context``
    it computed (None if it was ready or absent), the ``computed`` misses and the ``loaded``
    chunks (every one of the plan's, or none). Admission frees whatever pending slots the
    outcome does not hand over. The speeds feed the Loading Controller.
    """

    reason: str = ""
    context: ContextPrefix | None = None
    computed: tuple[ChunkMiss, ...] = ()
    loaded: tuple[ChunkLoad, ...] = ()
    seeded_tokens: int = 0
    load_s: float = 0.0
    compute_s: float = 0.0
    computed_rows: int = 0

    @property
    def blended(self) -> bool:
        return not self.reason

    @classmethod
    def not_blended(cls, reason: str) -> BlendOutcome:
        if not reason:
            raise ValueError("a request that was not blended needs a reason")
        return cls(reason=reason)


class BlendSource(Protocol):
    """What the model asks of admission, by request id."""

    def blend_request(self, rid: str) -> BlendRequest | None:
        """The request's blend decision, or None to prefill it normally."""

    def blend_report(self, rid: str) -> dict[str, object] | None:
        """The cache's accounting for a chunked request, reported in ``meta_info``."""

    def finish(self, rid: str, outcome: BlendOutcome) -> None:
        """The request's extend ran: take its new chunk KV into the index, release its chunk
        locks, free what was not used, and record the measured speeds."""
