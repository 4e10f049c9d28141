"""The narrow interface every tier implements, so another backend (Redis, an S3-style store,
Mooncake) is one module."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from sglang_cacheblend.store.entry import ChunkKV

__all__ = ["KVTier", "NotStored", "TierStats"]


@dataclass
class TierStats:
    """Counters of one tier (bytes and entries now; hits, misses, evictions, drops so far)."""

    entries: int = 0
    bytes: int = 0
    capacity_bytes: int = 0
    hits: int = 0
    misses: int = 0
    evictions: int = 0
    dropped: int = 0  # entries found damaged or foreign and deleted (disk)
    rejected: int = 0  # entries not stored: larger than the tier, or the tier refused them


class NotStored(Exception):
    """A tier's ``put`` declined the entry (larger than the tier, store full, tier unavailable):
    nothing is stored, and the caller counts it, as it would a failed write."""


class KVTier(Protocol):
    """A bounded store of chunk KV by key."""

    def get(self, key: str) -> ChunkKV | None:
        """The entry under ``key``, or None (never a damaged one)."""

    def put(self, key: str, kv: ChunkKV) -> list[tuple[str, ChunkKV]]:
        """Store ``kv``; return the entries evicted to make room (to spill one tier down).

        A persistent tier raises :class:`NotStored` when it declines the entry, so a write
        that stored nothing is never mistaken for one that landed."""

    def remove(self, key: str) -> bool:
        """Drop ``key``; whether it was there."""

    def stats(self) -> TierStats:
        """Sizes and counters."""
