"""Host-RAM tier: chunk KV in CPU memory, least recently used first out, bounded in bytes."""

from __future__ import annotations

from collections import OrderedDict

from sglang_cacheblend.store.entry import ChunkKV
from sglang_cacheblend.store.tier import TierStats

__all__ = ["HostTier"]


class HostTier:
    """An LRU of :class:`ChunkKV` holding at most ``capacity_bytes``.

    An entry larger than the whole tier is not stored (it is handed back as evicted, so the
    caller can put it one tier down).
    """

    def __init__(self, capacity_bytes: int) -> None:
        if isinstance(capacity_bytes, bool) or not isinstance(capacity_bytes, int) or (
                capacity_bytes < 0):
            raise ValueError(f"capacity_bytes must be an int >= 0, got {capacity_bytes!r}")
        self._capacity = capacity_bytes
        self._entries: OrderedDict[str, ChunkKV] = OrderedDict()
        self._bytes = 0
        self._stats = TierStats(capacity_bytes=capacity_bytes)

    def get(self, key: str) -> ChunkKV | None:
        kv = self._entries.get(key)
        if kv is None:
            self._stats.misses += 1
            return None
        self._entries.move_to_end(key)
        self._stats.hits += 1
        return kv

    def put(self, key: str, kv: ChunkKV) -> list[tuple[str, ChunkKV]]:
        if kv.nbytes > self._capacity:
            self._stats.rejected += 1
            return [(key, kv)]
        self.remove(key)
        evicted = []
        while self._bytes + kv.nbytes > self._capacity:
            old_key, old = self._entries.popitem(last=False)
            self._bytes -= old.nbytes
            self._stats.evictions += 1
            evicted.append((old_key, old))
        self._entries[key] = kv
        self._bytes += kv.nbytes
        return evicted

    def remove(self, key: str) -> bool:
        kv = self._entries.pop(key, None)
        if kv is None:
            return False
        self._bytes -= kv.nbytes
        return True

    def stats(self) -> TierStats:
        self._stats.entries, self._stats.bytes = len(self._entries), self._bytes
        return TierStats(**vars(self._stats))
