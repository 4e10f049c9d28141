"""Types of the chunk index: the namespace, result tuples, stats and the allocator protocol.

The chunk index maps a chunk (a namespace plus the chunk's token ids) to the KV that was computed
for that chunk standalone: slot indices in the token-to-KV pool (``kv_loc``) and the absolute
positions that KV was computed at (``positions``). It does not allocate slots: slots come from the
pool allocator, the index owns them after :meth:`radix_ext.ChunkIndex.insert`, and gives them back
through :class:`SlotFreer` when it evicts an entry.

Chunk KV is never modified in place. Every tensor the index hands out (``ChunkMatch.kv_loc``,
``ChunkMatch.positions``) is read-only by contract: a request that reuses a chunk copies (and
realigns) the cached KV into slots of its own and writes its blended KV there.
"""

from __future__ import annotations

from array import array
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, NamedTuple, Protocol, Union

if TYPE_CHECKING:
    import torch

TokenIds = Union[Sequence[int], "torch.Tensor"]
"""Token ids: a sequence of ints or a 1-D integer tensor (any device)."""

ChunkHashFn = Callable[[bytes], Hashable]
"""Hashes a chunk's token ids, packed as native-endian int64 bytes, to a lookup key.

Lookups compare the full token ids (and the namespace) on every hash hit, so a collision costs
time, never correctness. Tests inject a constant function to force collisions.
"""


class SlotFreer(Protocol):
    """What the index needs from the pool allocator: giving slots back.

    SGLang's ``BaseTokenToKVPoolAllocator.free`` satisfies it.
    """

    def free(self, kv_loc: torch.Tensor) -> None:
        """Return slots ``kv_loc`` (1-D int64) to the pool."""


@dataclass(frozen=True)
class ChunkNamespace:
    """Which KV a chunk's token ids stand for; chunks match only inside one namespace.

    Parameters
    ----------
    model : str
        Model identity (path or name plus revision); KV of one model is meaningless to another.
    cache_salt : str | None
        Tenant / ``cache_salt`` of the request: tenants never share KV.
    extra_key : str | None
        SGLang's per-request ``extra_key`` (it carries the LoRA adapter id, which changes KV).
    rope : tuple[tuple[str, Hashable], ...]
        Rotary configuration the keys were rotated with (keys are stored post-RoPE), as sorted
        ``(name, value)`` pairs, e.g. ``tuple(sorted(rope_config.items()))``.
    variant : str
        How the chunk KV was computed (e.g. which attention-sink prefix preceded the chunk and
        was dropped), so that KV computed differently never matches.
    """

    model: str
    cache_salt: str | None = None
    extra_key: str | None = None
    rope: tuple[tuple[str, Hashable], ...] = ()
    variant: str = ""

    def __post_init__(self) -> None:
        if not self.model:
            raise ValueError("ChunkNamespace.model must be a non-empty string")
        if any(not isinstance(item, tuple) or len(item) != 2 for item in self.rope):
            raise ValueError(f"ChunkNamespace.rope must hold (name, value) pairs, got {self.rope}")
        hash(self)  # every field must be hashable: fail here, not at the first lookup


class ChunkMatch(NamedTuple):
    """Result of looking up one chunk span ``[start, end)`` of a prompt.

    ``start`` and ``end`` bound the span in the prompt looked up, half-open as everywhere else,
    exactly as passed to :meth:`radix_ext.ChunkIndex.match`. ``kv_loc`` and ``positions`` are the
    index's own tensors, shape ``(end - start,)``, int64; ``kv_loc`` lives on the allocator's
    device, ``positions`` on CPU and holds the absolute positions the cached KV was computed at
    (not the span's positions in this prompt). Treat both as read-only. A miss has ``entry_id``,
    ``kv_loc`` and ``positions`` set to ``None``.
    """

    start: int
    end: int
    entry_id: int | None
    kv_loc: torch.Tensor | None
    positions: torch.Tensor | None

    @property
    def hit(self) -> bool:
        return self.entry_id is not None


class InsertChunkResult(NamedTuple):
    """Result of inserting a chunk.

    ``inserted`` is False when the chunk was already cached: then ``kv_loc``/``positions`` are
    the existing entry's and ``redundant_loc`` holds the caller's slots, which the index did not
    take and the caller must free. ``redundant_loc`` is ``None`` when the index took the slots
    (or when the caller passed exactly the slots the entry already owns).
    """

    entry_id: int
    inserted: bool
    kv_loc: torch.Tensor
    positions: torch.Tensor
    redundant_loc: torch.Tensor | None


class LockResult(NamedTuple):
    """Result of locking chunks for a request.

    ``newly_locked_len`` counts the tokens of entries this call locked for the request (entries
    it already held are not counted again); ``stale`` lists the indices (into the matches
    passed) of hits whose entry is no longer in the index, which were not locked: treat them as
    misses.
    """

    newly_locked_len: int
    stale: tuple[int, ...]


class ChunkEvictResult(NamedTuple):
    """Result of an eviction: the tokens and entries it freed.

    Entries go whole, so ``num_tokens_evicted`` may exceed the tokens asked for.
    """

    num_tokens_evicted: int
    num_entries_evicted: int


class EvictedChunk(NamedTuple):
    """An entry about to be evicted, as the ``on_evict`` listener sees it.

    ``kv_loc`` still holds the chunk's KV when the listener runs (freed right after);
    ``token_bytes`` are the packed token ids (:func:`radix_ext.keys.pack_token_ids`).
    """

    namespace: Hashable
    token_bytes: bytes
    kv_loc: torch.Tensor
    positions: torch.Tensor

    @property
    def token_ids(self) -> list[int]:
        """The token ids, unpacked (native-endian int64, as ``pack_token_ids`` packs them)."""
        return array("q", self.token_bytes).tolist()


class LruHead(NamedTuple):
    """The least recently used evictable entry: when it was last accessed and its length."""

    last_access_time: float
    length: int


@dataclass(frozen=True)
class ChunkStats:
    """Counters and sizes of a chunk index (sizes in tokens).

    ``hits``/``misses`` count request spans when a request locks its matches, once per
    (request, span), so the scheduler's repeated side-effect-free lookups do not inflate them.
    """

    hits: int
    misses: int
    hit_tokens: int
    inserts: int
    duplicate_inserts: int
    evictions: int
    evicted_tokens: int
    num_entries: int
    evictable_size: int
    locked_size: int

    @property
    def total_size(self) -> int:
        return self.evictable_size + self.locked_size
