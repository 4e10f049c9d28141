"""The KV Cache Store: the tiers below SGLang's token pool, asked in order, written in the back.

Where a chunk's KV goes
-----------------------
- **Spill** (the pool evicts a chunk): into the host-RAM tier; what that tier evicts in turn goes
  to the persistent tiers (disk, then a shared store such as Mooncake), unless the store writes
  through, in which case they already hold it and it is simply dropped.
- **Write-through** (a chunk was just computed: a precompute, a missed chunk, an ingest): to the
  persistent tiers at once, so a restart or another server finds it.
- **Lookup** (a request misses the pool): host, then writes still queued, then disk, then the
  shared tier; the first that has the chunk serves it. A host hit leaves the host tier (the
  chunk moves back into the pool, and spills again when the pool evicts it): host RAM and the
  pool never hold the same chunk twice.

Persistent writes (encoding, checksumming, file or network I/O: tens of milliseconds for a
512-token chunk) run on one writer thread, so SGLang's scheduler only pays for the copy out of
the pool. A queued write is served from the queue until it lands. The queue is bounded: when it
is full, a write is skipped and counted (the chunk stays computable), never blocking the
scheduler. The host tier is used by the scheduler thread only; a persistent tier is written by
the writer thread while the scheduler reads it, so it must be safe for that (one writer, one
reader) without making a read wait for a write's I/O: a read never waits on another chunk's
write.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

from sglang_cacheblend.store.entry import ChunkKV
from sglang_cacheblend.store.tier import KVTier, TierStats

__all__ = ["ChunkStore", "StoreHit", "WritePolicy"]

logger = logging.getLogger(__name__)

WritePolicy = Literal["write-through", "spill"]
HOST = "host"


@dataclass(frozen=True)
class StoreHit:
    """A chunk found below the pool: which tier served it and how long the read took."""

    tier: str
    kv: ChunkKV
    read_s: float


class _NamedTier:
    """A tier and the name reports and ``StoreHit.tier`` give it."""

    def __init__(self, name: str, tier: KVTier) -> None:
        self.name, self.tier = name, tier

    def get(self, key: str) -> ChunkKV | None:
        return self.tier.get(key)

    def take(self, key: str) -> ChunkKV | None:
        """``get`` and, on a hit, ``remove``."""
        kv = self.tier.get(key)
        if kv is not None:
            self.tier.remove(key)
        return kv

    def put(self, key: str, kv: ChunkKV) -> list[tuple[str, ChunkKV]]:
        return self.tier.put(key, kv)

    def stats(self) -> TierStats:
        return self.tier.stats()


class ChunkStore:
    """Host RAM (optional) above persistent tiers (disk, shared), with one writer thread.

    Parameters
    ----------
    host : KVTier, optional
        The spill tier for pool evictions.
    persistent : sequence of (name, KVTier)
        Lower tiers in lookup order, e.g. ``[("disk", DiskTier(...)), ("mooncake", ...)]``.
    policy : "write-through" or "spill"
        Whether newly computed chunks go to the persistent tiers at once, or only what the host
        tier evicts does.
    max_queued_writes : int
        Bound of the writer queue (chunks).
    """

    def __init__(self, *, host: KVTier | None = None,
                 persistent: Sequence[tuple[str, KVTier]] = (),
                 policy: WritePolicy = "write-through", max_queued_writes: int = 64) -> None:
        if policy not in ("write-through", "spill"):
            raise ValueError(f"policy must be 'write-through' or 'spill', got {policy!r}")
        if host is None and not persistent:
            raise ValueError("a ChunkStore needs at least one tier")
        self._host = None if host is None else _NamedTier(HOST, host)
        self._persistent = [_NamedTier(name, tier) for name, tier in persistent]
        self.policy: WritePolicy = policy
        self._queue: queue.Queue[tuple[str, ChunkKV] | None] = queue.Queue(max_queued_writes)
        self._queued: dict[str, ChunkKV] = {}
        self._queued_lock = threading.Lock()
        self._skipped_writes = self._failed_writes = self._spills = 0
        self._writer: threading.Thread | None = None
        if self._persistent:
            self._writer = threading.Thread(target=self._write_loop, name="cacheblend-store",
                                            daemon=True)
            self._writer.start()

    @property
    def tier_names(self) -> list[str]:
        return [t.name for t in ([self._host] if self._host else []) + self._persistent]

    @property
    def takes_spills(self) -> bool:
        """Whether a chunk the pool evicts is kept anywhere (else copying it out is waste)."""
        return self._host is not None or (self.policy == "spill" and bool(self._persistent))

    @property
    def writes_through(self) -> bool:
        return self.policy == "write-through" and bool(self._persistent)

    # ------------------------------------------------------------------ reads

    def get(self, key: str) -> StoreHit | None:
        """The chunk from the first tier that holds it (never a damaged entry), or None."""
        started = time.perf_counter()
        if self._host is not None:
            kv = self._host.take(key)
            if kv is not None:
                return StoreHit(HOST, kv, time.perf_counter() - started)
        with self._queued_lock:
            kv = self._queued.get(key)
        if kv is not None:
            return StoreHit(self._persistent[0].name, kv, time.perf_counter() - started)
        for tier in self._persistent:
            kv = tier.get(key)
            if kv is not None:
                return StoreHit(tier.name, kv, time.perf_counter() - started)
        return None

    # ------------------------------------------------------------------ writes

    def spill(self, key: str, kv: ChunkKV) -> None:
        """A chunk the pool evicts: host tier first; what falls out of it goes lower."""
        self._spills += 1
        fallen = [(key, kv)] if self._host is None else self._host.put(key, kv)
        if self.policy == "write-through":
            return  # the persistent tiers got it when it was computed
        for fallen_key, fallen_kv in fallen:
            self._enqueue(fallen_key, fallen_kv)

    def persist(self, key: str, kv: ChunkKV) -> None:
        """A chunk just computed: to the persistent tiers now (write-through), in the back."""
        if self.writes_through:
            self._enqueue(key, kv)

    def _enqueue(self, key: str, kv: ChunkKV) -> None:
        if not self._persistent:
            return
        with self._queued_lock:
            if key in self._queued:
                return
            try:
                self._queue.put_nowait((key, kv))
            except queue.Full:
                self._skipped_writes += 1
                return
            self._queued[key] = kv

    def _write_loop(self) -> None:
        while True:
            item = self._queue.get()
            try:
                if item is None:
                    return
                key, kv = item
                for tier in self._persistent:
                    try:
                        tier.put(key, kv)
                    except Exception as exc:  # noqa: BLE001 - a full disk must not stop serving
                        self._failed_writes += 1
                        logger.warning("chunk KV write to the %s tier failed (%s: %s); the "
                                       "chunk stays in the tiers above", tier.name,
                                       type(exc).__name__, exc)
                with self._queued_lock:
                    self._queued.pop(key, None)
            finally:
                self._queue.task_done()

    def flush(self, timeout_s: float = 30.0) -> bool:
        """Wait (at most ``timeout_s``) until every queued write has landed; whether it did."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            with self._queued_lock:
                if not self._queued:
                    return True
            time.sleep(0.01)
        return False

    def close(self, timeout_s: float = 30.0) -> None:
        """Land the queued writes, stop the writer thread, close the tiers that need it
        (Mooncake's client must leave before its master and metadata server do)."""
        if self._writer is not None and self._writer.is_alive():
            self.flush(timeout_s)
            self._queue.put(None)
            self._writer.join(timeout_s)
        for tier in self._persistent:
            close = getattr(tier.tier, "close", None)
            if callable(close):
                try:
                    close()
                except Exception:  # noqa: BLE001 - shutting down: report, go on
                    logger.exception("closing the %s tier failed", tier.name)

    # ------------------------------------------------------------------ accounting

    def stats(self) -> dict[str, object]:
        """Per tier: entries, bytes, capacity, hits, misses, evictions, dropped; and the writer's
        counters (what ``/server_info`` shows)."""
        tiers = {t.name: vars(t.stats()) for t in
                 ([self._host] if self._host else []) + self._persistent}
        with self._queued_lock:
            queued = len(self._queued)
        return {"policy": self.policy, "tiers": tiers, "spills": self._spills,
                "queued_writes": queued, "skipped_writes": self._skipped_writes,
                "failed_writes": self._failed_writes}
