"""Interfaces and result types of the chunk index.

The chunk index maps a chunk (a namespace plus the chunk's token ids) to the KV that was computed
for that chunk standalone: slot indices in the token-to-KV pool (``kv_loc``) and the absolute
positions that KV was computed at (``positions``). It does not allocate slots: slots come from the
pool allocator, the index owns them after :meth:`BaseChunkIndex.insert`, and gives them back
through :class:`SlotFreer` when it evicts or clears an entry.

Chunk KV is never modified in place. Every tensor the index hands out (``ChunkMatch.kv_loc``,
``ChunkMatch.positions``) is read-only by contract: a request that reuses a chunk copies (and
realigns) the cached KV into slots of its own and writes its blended KV there.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Hashable, Iterable, Sequence
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
        ``(name, value)`` pairs; build it with :meth:`from_rope_config`.
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

    @classmethod
    def from_rope_config(
        cls,
        model: str,
        rope_config: dict[str, Hashable],
        *,
        cache_salt: str | None = None,
        extra_key: str | None = None,
        variant: str = "",
    ) -> ChunkNamespace:
        """Build a namespace from a rotary config mapping (e.g. base, rotary_dim, is_neox)."""
        rope = tuple(sorted(rope_config.items()))
        return cls(model, cache_salt, extra_key, rope, variant)


class ChunkMatch(NamedTuple):
    """Result of looking up one chunk span of a prompt.

    ``kv_loc`` and ``positions`` are the index's own tensors, shape ``(span_len,)``, int64;
    ``kv_loc`` lives on the allocator's device, ``positions`` on CPU and holds the absolute
    positions the cached KV was computed at (not the span's positions in this prompt). Treat both
    as read-only. A miss has ``entry_id``, ``kv_loc`` and ``positions`` set to ``None``.
    """

    span_start: int
    span_len: int
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
    it already held are not counted again); ``stale`` lists the indices (into the entry ids
    passed) of entries no longer in the index, which were not locked: treat them as misses.
    """

    newly_locked_len: int
    stale: tuple[int, ...]


class ChunkEvictResult(NamedTuple):
    num_tokens_evicted: int
    num_entries_evicted: int


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


class BaseChunkIndex(ABC):
    """A store of standalone chunk KV, keyed by namespace and token ids."""

    @abstractmethod
    def match(
        self, namespace: Hashable, prompt_ids: TokenIds, spans: Iterable[tuple[int, int]]
    ) -> list[ChunkMatch]:
        """Look up every ``[start, end)`` span of ``prompt_ids``; only access times change."""

    @abstractmethod
    def insert(
        self,
        namespace: Hashable,
        token_ids: TokenIds,
        kv_loc: torch.Tensor,
        positions: int | torch.Tensor,
        *,
        rid: Hashable | None = None,
    ) -> InsertChunkResult:
        """Take ownership of ``kv_loc`` for a new chunk, or report the existing one."""

    @abstractmethod
    def lock(self, rid: Hashable, matches: Sequence[ChunkMatch]) -> LockResult:
        """Protect the hit entries of ``matches`` from eviction until ``unlock(rid)``."""

    @abstractmethod
    def unlock(self, rid: Hashable) -> int:
        """Release every lock ``rid`` holds; return the tokens it held (0 for unknown rids)."""

    @abstractmethod
    def evict(self, num_tokens: int, *, older_than: float | None = None) -> ChunkEvictResult:
        """Evict unlocked entries, least recently used first, freeing their slots."""

    @abstractmethod
    def clear(self) -> int:
        """Evict every entry (no locks may be held); return the tokens freed."""

    @abstractmethod
    def reset(self) -> None:
        """Forget every entry and lock without freeing slots (the pool is cleared as a whole)."""

    @abstractmethod
    def evictable_size(self) -> int: ...

    @abstractmethod
    def locked_size(self) -> int: ...

    @abstractmethod
    def stats(self) -> ChunkStats: ...

    @abstractmethod
    def check_integrity(self) -> None:
        """Raise ``AssertionError`` if any internal invariant is broken."""
