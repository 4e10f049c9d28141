"""Local-disk tier: one safetensors file per chunk, checked on every read, written atomically.

The tier survives a restart (its files are the index). A file that is truncated, corrupted,
written by another format version or stored under another key is detected on read, deleted
with a warning, and reported as a miss, so the chunk is recomputed and never served damaged.

The store's writer thread writes while SGLang's scheduler reads: one lock guards the index
(sizes, recency), never the file I/O, so a read does not wait for another chunk's write.

A full disk: the file system may fill before the configured capacity (the folder's disk is
smaller, or shared). A write therefore first evicts for the free space it needs as well as for
the capacity; should the disk still fill under it (ENOSPC), it evicts as much again and retries
once. A failed write never leaves its temporary file behind, so the tier never wedges itself:
after a restart on a full disk the first write evicts the oldest files like any other.

The folder is owned by one tier at a time and private (:mod:`~.disk_folder`).
"""

from __future__ import annotations

import errno
import logging
import os
import threading
from collections import OrderedDict
from pathlib import Path

from sglang_cacheblend.store import codec, disk_folder
from sglang_cacheblend.store.entry import ChunkKV
from sglang_cacheblend.store.tier import NotStored, TierStats

__all__ = ["DiskTier"]

logger = logging.getLogger(__name__)

VERSION = codec.VERSION  # the format version this tier writes (a test writes a foreign one)
_SUFFIX = ".safetensors"
_DISK_FULL = (errno.ENOSPC, errno.EDQUOT)
# Left free on the file system besides a write's own bytes (block rounding, other writers).
FREE_RESERVE_BYTES = 1 << 20


class DiskTier:
    """Chunk KV files under ``root``, at most ``capacity_bytes`` of them and never more than the
    file system has room for (least recently read or written first out).

    Raises ``RuntimeError`` naming ``root`` when another tier (another server, another
    data-parallel rank) owns the folder; :meth:`close` gives it up.
    """

    def __init__(self, root: Path | str, capacity_bytes: int) -> None:
        if isinstance(capacity_bytes, bool) or not isinstance(capacity_bytes, int) or (
                capacity_bytes < 0):
            raise ValueError(f"capacity_bytes must be an int >= 0, got {capacity_bytes!r}")
        self._root = Path(root)
        self._folder = disk_folder.OwnedFolder(self._root)
        self._capacity = capacity_bytes
        self._stats = TierStats(capacity_bytes=capacity_bytes)
        self._lock = threading.Lock()
        self._folder.remove_stale_temporaries()
        # key -> bytes on disk, least recently used first; the files are the truth across
        # restarts (a read refreshes a file's mtime, so the order survives one).
        self._index: OrderedDict[str, int] = OrderedDict()
        for key, size, _ in sorted(self._folder.chunk_files(_SUFFIX), key=lambda f: f[2]):
            self._index[key] = size
        self._bytes = sum(self._index.values())
        with self._lock:
            self._evict_bytes(self._bytes - self._capacity)  # the capacity was lowered
        room = self._bytes + self._folder.free_bytes()
        if room < self._capacity:
            logger.warning("the disk tier at %s may hold %d MiB, but its file system has room "
                           "for %d MiB of it: the tier evicts when the disk fills",
                           self._root, self._capacity >> 20, room >> 20)

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
        except FileNotFoundError:  # deleted by hand since: a plain miss, not damage
            with self._lock:
                self._forget(key)
                self._stats.misses += 1
            return None
        except Exception as exc:  # noqa: BLE001 - any damage means: recompute, never serve
            logger.warning("chunk KV file %s is unusable (%s); dropped, the chunk is recomputed",
                           path, exc)
            with self._lock:
                self._drop(key)
                self._stats.misses += 1
                self._stats.dropped += 1
            return None
        with self._lock:
            if key in self._index:
                self._index.move_to_end(key)
            self._stats.hits += 1
        try:
            os.utime(path)  # the recency a restart reads; best effort (another user's file)
        except OSError:
            pass
        return kv

    def put(self, key: str, kv: ChunkKV) -> list[tuple[str, ChunkKV]]:
        """Write ``kv`` atomically (a temporary file renamed into place), evicting first what
        it needs room for; evicted entries are deleted, not returned: disk is the last local
        tier. Raises :class:`NotStored` for an entry larger than the tier, ``OSError`` when
        the write fails (the disk still full after evicting and retrying once)."""
        path = self._path(key)
        data = codec.encode(key, kv, version=VERSION)
        size = len(data)
        if size > self._capacity:
            with self._lock:
                self._stats.rejected += 1
            raise NotStored(f"a chunk of {size} bytes is larger than the disk tier "
                            f"({self._capacity} bytes)")
        free = self._folder.free_bytes()
        with self._lock:
            over_capacity = self._bytes - self._index.get(key, 0) + size - self._capacity
            freed = self._evict_bytes(over_capacity, keep=key)
            self._evict_bytes(size + FREE_RESERVE_BYTES - free - freed, keep=key)
        tmp = self._folder.temporary(key)
        try:
            try:
                disk_folder.write_private(tmp, data)
            except OSError as exc:
                if exc.errno not in _DISK_FULL:
                    raise
                disk_folder.remove_quietly(tmp)
                with self._lock:
                    evicted = self._evict_bytes(size, keep=key)
                if not evicted:  # another program filled the disk: nothing of ours to free
                    raise
                logger.warning("the disk holding %s is full before the tier's capacity; "
                               "evicted %d bytes and writing again", self._root, evicted)
                disk_folder.write_private(tmp, data)
            with self._lock:
                os.replace(tmp, path)
                self._bytes += size - self._index.pop(key, 0)
                self._index[key] = size
        finally:
            if tmp.exists():
                disk_folder.remove_quietly(tmp)
        return []

    def remove(self, key: str) -> bool:
        with self._lock:
            present = key in self._index
            self._drop(key)
        return present

    def _evict_bytes(self, amount: int, *, keep: str | None = None) -> int:
        """Evict least recently used entries (never ``keep``) until ``amount`` bytes are freed
        or nothing is left to evict; the bytes freed. The caller holds the lock."""
        freed = 0
        while freed < amount:
            victim = next((k for k in self._index if k != keep), None)
            if victim is None:
                break
            freed += self._index[victim]
            self._drop(victim)
            self._stats.evictions += 1
        return freed

    def _forget(self, key: str) -> None:
        """Take ``key`` out of the index (its file is gone); the caller holds the lock."""
        self._bytes -= self._index.pop(key, 0)

    def _drop(self, key: str) -> None:
        """Forget ``key`` and delete its file, best effort (a file that cannot be deleted is
        forgotten all the same: never read again here); the caller holds the lock."""
        self._forget(key)
        disk_folder.remove_quietly(self._path(key))

    def stats(self) -> TierStats:
        with self._lock:
            self._stats.entries = len(self._index)
            self._stats.bytes = self._bytes
            return TierStats(**vars(self._stats))

    def check_integrity(self) -> None:
        """The byte count matches the index, and the index fits the capacity."""
        with self._lock:
            assert self._bytes == sum(self._index.values()), (self._bytes, self._index)
            assert self._bytes <= self._capacity, (self._bytes, self._capacity)

    def close(self) -> None:
        """Give the folder up; the tier must not be used after."""
        self._folder.release()
