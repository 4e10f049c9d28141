"""Local-disk tier: one safetensors file per chunk, checked on every read, written atomically.

The tier survives a restart (its files are the index). A file that is truncated, corrupted,
written by another format version or stored under another key is detected on read, deleted
with a warning, and reported as a miss, so the chunk is recomputed and never served damaged.

The store's writer thread writes while SGLang's scheduler reads: one lock guards the index
(sizes, access times), never the file I/O, so a read does not wait for another chunk's write.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from pathlib import Path

from sglang_cacheblend.store import codec
from sglang_cacheblend.store.entry import ChunkKV
from sglang_cacheblend.store.tier import TierStats

__all__ = ["DiskTier"]

logger = logging.getLogger(__name__)

VERSION = codec.VERSION  # the format version this tier writes (a test writes a foreign one)
_SUFFIX = ".safetensors"


class DiskTier:
    """Chunk KV files under ``root``, at most ``capacity_bytes`` of them (least recently read
    or written first out)."""

    def __init__(self, root: Path | str, capacity_bytes: int) -> None:
        if isinstance(capacity_bytes, bool) or not isinstance(capacity_bytes, int) or (
                capacity_bytes < 0):
            raise ValueError(f"capacity_bytes must be an int >= 0, got {capacity_bytes!r}")
        self._root = Path(root)
        self._root.mkdir(parents=True, exist_ok=True)
        self._capacity = capacity_bytes
        self._stats = TierStats(capacity_bytes=capacity_bytes)
        self._lock = threading.Lock()
        for stale in self._root.glob(".*.tmp"):  # a write cut off by a crash
            stale.unlink(missing_ok=True)
        # key -> (bytes on disk, last access); the files are the truth across restarts.
        self._index: dict[str, tuple[int, float]] = {
            path.name.removesuffix(_SUFFIX): (path.stat().st_size, path.stat().st_mtime)
            for path in self._root.glob(f"*{_SUFFIX}")
        }

    def _path(self, key: str) -> Path:
        if not key or not all(c in "0123456789abcdef" for c in key):
            raise ValueError(f"disk tier keys are lowercase hex digests, got {key!r}")
        return self._root / f"{key}{_SUFFIX}"

    def get(self, key: str) -> ChunkKV | None:
        path = self._path(key)
        with self._lock:
            known = key in self._index
            if not known:
                self._stats.misses += 1
        if not known:
            return None
        try:
            kv = codec.decode(key, path.read_bytes())
        except Exception as exc:  # noqa: BLE001 - any damage means: recompute, never serve
            logger.warning("chunk KV file %s is unusable (%s); dropped, the chunk is recomputed",
                           path, exc)
            with self._lock:
                self._drop(key)
                self._stats.misses += 1
                self._stats.dropped += 1
            return None
        now = time.time()
        with self._lock:
            if key in self._index:
                self._index[key] = (self._index[key][0], now)
                os.utime(path, (now, now))
            self._stats.hits += 1
        return kv

    def put(self, key: str, kv: ChunkKV) -> list[tuple[str, ChunkKV]]:
        """Write ``kv`` atomically (a temporary file renamed into place); evicted entries are
        deleted, not returned: disk is the last local tier."""
        path = self._path(key)
        data = codec.encode(key, kv, version=VERSION)
        size = len(data)
        if size > self._capacity:
            return []
        tmp = self._root / f".{key}.{os.getpid()}.{threading.get_ident()}.tmp"
        tmp.write_bytes(data)
        with self._lock:
            self._index.pop(key, None)
            while self._index and sum(s for s, _ in self._index.values()) + size > self._capacity:
                oldest = min(self._index, key=lambda k: self._index[k][1])
                self._drop(oldest)
                self._stats.evictions += 1
            os.replace(tmp, path)
            self._index[key] = (size, time.time())
        return []

    def remove(self, key: str) -> bool:
        with self._lock:
            present = key in self._index
            self._drop(key)
        return present

    def _drop(self, key: str) -> None:
        """Forget ``key`` and delete its file; the caller holds the lock."""
        self._index.pop(key, None)
        self._path(key).unlink(missing_ok=True)

    def stats(self) -> TierStats:
        with self._lock:
            self._stats.entries = len(self._index)
            self._stats.bytes = sum(size for size, _ in self._index.values())
            return TierStats(**vars(self._stats))
