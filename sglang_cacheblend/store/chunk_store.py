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
the pool. A queued write is served from the queue until it lands. The queue is bounded in chunks
and in bytes (each entry is a CPU copy of a whole chunk's KV, up to a gigabyte for a long chunk
of a large model): when it is full, a write is skipped and counted (the chunk stays
computable), never blocking the scheduler.

Faults: no exception from a tier reaches the caller. A read that raises is a miss; a write that
a tier declines (:class:`~.tier.NotStored`) or that fails is counted and logged (at most once a
minute per kind), and ``stats()["unstored_writes"]`` counts every chunk that did not reach all
persistent tiers, so a client can tell whether what it wrote was stored. The host tier is used by the scheduler thread only; a persistent tier is written by
the writer thread while the scheduler reads it, so it must be safe for that (one writer, one
reader) without making a read wait for a write's I/O: a read never waits on another chunk's
write.
"""

from __future__ import annotations

import logging
import math
import queue
import threading
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

from sglang_cacheblend.store.entry import ChunkKV
from sglang_cacheblend.store.tier import KVTier, NotStored, TierStats

__all__ = ["ChunkStore", "StoreHit", "WritePolicy"]

logger = logging.getLogger(__name__)

WritePolicy = Literal["write-through", "spill"]
HOST = "host"
MAX_QUEUED_BYTES = 512 << 20


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


class _ThrottledWarnings:
    """At most one warning per kind every ``interval_s``, saying how many were held back: a
    full disk fails every write, and one line a write would bury the log."""

    def __init__(self, interval_s: float = 60.0) -> None:
        self._interval = interval_s
        self._last: dict[str, float] = {}
        self._held: Counter[str] = Counter()
        self._lock = threading.Lock()

    def warn(self, kind: str, message: str, *args: object) -> None:
        now = time.monotonic()
        with self._lock:
            if now - self._last.get(kind, -math.inf) < self._interval:
                self._held[kind] += 1
                return
            self._last[kind] = now
            held = self._held.pop(kind, 0)
        if held:
            message += f" ({held} more since the last such warning)"
        logger.warning(message, *args)


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
        Bound of the writer queue, in chunks.
    max_queued_bytes : int
        Bound of the writer queue, in bytes of chunk KV (512 MiB by default). A chunk larger
        than this is queued only when the queue is empty, so the queue holds at most the
        larger of this and one chunk.
    """

    def __init__(self, *, host: KVTier | None = None,
                 persistent: Sequence[tuple[str, KVTier]] = (),
                 policy: WritePolicy = "write-through", max_queued_writes: int = 64,
                 max_queued_bytes: int = MAX_QUEUED_BYTES) -> None:
        if policy not in ("write-through", "spill"):
            raise ValueError(f"policy must be 'write-through' or 'spill', got {policy!r}")
        if host is None and not persistent:
            raise ValueError("a ChunkStore needs at least one tier")
        for name, value in (("max_queued_writes", max_queued_writes),
                            ("max_queued_bytes", max_queued_bytes)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an int >= 1, got {value!r}")
        self._host = None if host is None else _NamedTier(HOST, host)
        self._persistent = [_NamedTier(name, tier) for name, tier in persistent]
        self.policy: WritePolicy = policy
        self._queue: queue.Queue[tuple[str, ChunkKV] | None] = queue.Queue(max_queued_writes)
        self._max_queued_bytes = max_queued_bytes
        self._queued: dict[str, ChunkKV] = {}
        self._queued_bytes = 0
        self._queued_lock = threading.Lock()
        self._counts: Counter[str] = Counter()  # see stats()
        self._warnings = _ThrottledWarnings()
        self._stopping = threading.Event()
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
        """The chunk from the first tier that holds it (never a damaged entry), or None.

        A host hit leaves host RAM: hand it back with :meth:`give_back` if it is not used.
        Never raises for a tier's fault: a tier whose read raises is counted
        (``read_errors``), logged, and asked no further for this key.
        """
        started = time.perf_counter()
        if self._host is not None:
            kv = self._read(self._host, key, take=True)
            if kv is not None:
                return StoreHit(HOST, kv, time.perf_counter() - started)
        with self._queued_lock:
            kv = self._queued.get(key)
        if kv is not None:
            return StoreHit(self._persistent[0].name, kv, time.perf_counter() - started)
        for tier in self._persistent:
            kv = self._read(tier, key)
            if kv is not None:
                return StoreHit(tier.name, kv, time.perf_counter() - started)
        return None

    def _read(self, tier: _NamedTier, key: str, *, take: bool = False) -> ChunkKV | None:
        try:
            return tier.take(key) if take else tier.get(key)
        except Exception as exc:  # noqa: BLE001 - one tier's fault is a miss, not a failure
            self._counts["read_errors"] += 1
            self._warnings.warn(f"read:{tier.name}", "chunk KV read from the %s tier failed "
                                "(%s: %s); served as a miss", tier.name, type(exc).__name__, exc)
            return None

    def give_back(self, key: str, kv: ChunkKV, tier: str) -> None:
        """Return a hit the caller did not use (it did not fit the pool, the request failed or
        went away before its forward): ``kv`` as :meth:`get` returned it, ``tier`` its
        ``StoreHit.tier``. A host hit left host RAM when it was read, so it goes back there
        (most recently used; with the "spill" policy what that evicts goes down, as in
        :meth:`spill`); a hit of another tier is still stored there, so nothing happens."""
        if tier != HOST or self._host is None:
            return
        self._counts["given_back"] += 1
        self._keep_in_host(key, kv)

    # ------------------------------------------------------------------ writes

    def spill(self, key: str, kv: ChunkKV) -> None:
        """A chunk the pool evicts: host tier first; what falls out of it goes lower."""
        self._counts["spills"] += 1
        self._keep_in_host(key, kv)

    def _keep_in_host(self, key: str, kv: ChunkKV) -> None:
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
            why = self._no_room_for(kv.nbytes)
            if why is None:
                try:
                    self._queue.put_nowait((key, kv))
                except queue.Full:
                    why = f"{self._queue.maxsize} chunks queued"
            if why is not None:
                self._counts["skipped_writes"] += 1
                self._counts["unstored_writes"] += 1
            else:
                self._queued[key] = kv
                self._queued_bytes += kv.nbytes
        if why is not None:
            self._warnings.warn("skipped", "chunk KV write skipped (%s): the chunk is not "
                                "stored below the pool", why)

    def _no_room_for(self, nbytes: int) -> str | None:
        """Why the queue cannot take ``nbytes`` more, or None; the caller holds the lock."""
        if self._stopping.is_set():
            return "the store is closing"
        if self._queued and self._queued_bytes + nbytes > self._max_queued_bytes:
            return (f"{self._queued_bytes} bytes queued, {nbytes} more would pass "
                    f"{self._max_queued_bytes}")
        return None

    def _write_loop(self) -> None:
        while True:
            item = self._queue.get()
            try:
                if item is None or self._stopping.is_set():
                    return
                key, kv = item
                stored = [self._write(tier, key, kv) for tier in self._persistent]  # each tier
                with self._queued_lock:  # _enqueue counts unstored writes too
                    self._counts["stored_writes" if all(stored) else "unstored_writes"] += 1
                    self._queued.pop(key, None)
                    self._queued_bytes -= kv.nbytes
            finally:
                self._queue.task_done()

    def _write(self, tier: _NamedTier, key: str, kv: ChunkKV) -> bool:
        """``kv`` into ``tier``; whether it was stored (never raises: a full disk must not stop
        serving)."""
        try:
            tier.put(key, kv)
            return True
        except NotStored as exc:
            self._counts["rejected_writes"] += 1
            self._warnings.warn(f"rejected:{tier.name}", "the %s tier did not store a chunk "
                                "(%s); it stays in the tiers above", tier.name, exc)
        except Exception as exc:  # noqa: BLE001
            self._counts["failed_writes"] += 1
            self._warnings.warn(f"failed:{tier.name}", "chunk KV write to the %s tier failed "
                                "(%s: %s); the chunk stays in the tiers above", tier.name,
                                type(exc).__name__, exc)
        return False

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
        (Mooncake's client must leave before its master and metadata server do). Returns
        within about ``timeout_s`` plus the tiers' own closing, even if a write hangs (a hung
        network file system): what is still queued then is not stored."""
        deadline = time.monotonic() + timeout_s
        if self._writer is not None and self._writer.is_alive():
            self.flush(timeout_s)
            self._stopping.set()  # a writer stuck in a write stops after it
            try:
                self._queue.put_nowait(None)  # a writer waiting for work stops now
            except queue.Full:
                pass
            self._writer.join(max(0.0, deadline - time.monotonic()))
            if self._writer.is_alive():
                with self._queued_lock:
                    left = len(self._queued)
                logger.warning("the store's writer is still writing after %g s; %d queued "
                               "chunk writes are not stored", timeout_s, left)
        self._stopping.set()
        for tier in self._persistent:
            close = getattr(tier.tier, "close", None)
            if callable(close):
                try:
                    close()
                except Exception:  # shutting down: report, go on
                    logger.exception("closing the %s tier failed", tier.name)

    # ------------------------------------------------------------------ accounting

    def check_integrity(self) -> None:
        """The queue's byte count matches what it holds, and each tier that can check itself
        is consistent."""
        with self._queued_lock:
            held = sum(kv.nbytes for kv in self._queued.values())
            assert self._queued_bytes == held, (self._queued_bytes, held)
        for tier in ([self._host] if self._host else []) + self._persistent:
            check = getattr(tier.tier, "check_integrity", None)
            if callable(check):
                check()

    def stats(self) -> dict[str, object]:
        """What ``/server_info`` shows: per tier, its :class:`TierStats` (entries, bytes,
        capacity, hits, misses, evictions, dropped, rejected); and the store's counters:

        - ``queued_writes``/``queued_bytes``: chunks waiting for the writer now;
        - ``stored_writes``: chunks written to every persistent tier;
        - ``unstored_writes``: chunks that did not reach every persistent tier (skipped,
          rejected by a tier, or failed). A client that wrote chunks compares it before and
          after its writes land: unchanged means each of them was stored;
        - ``skipped_writes``: chunks not queued (queue full, in chunks or bytes, or closing);
        - ``rejected_writes``/``failed_writes``: tier writes declined (larger than the tier,
          store full or unavailable) or raising (I/O error), one per tier;
        - ``read_errors``: tier reads that raised (served as misses);
        - ``spills``, ``given_back``: chunks from the pool, and host hits returned unused.
        """
        tiers = {t.name: vars(t.stats()) for t in
                 ([self._host] if self._host else []) + self._persistent}
        with self._queued_lock:
            queued, queued_bytes = len(self._queued), self._queued_bytes
        counts = {name: self._counts[name] for name in (
            "stored_writes", "unstored_writes", "skipped_writes", "rejected_writes",
            "failed_writes", "read_errors", "spills", "given_back")}
        return {"policy": self.policy, "tiers": tiers, "queued_writes": queued,
                "queued_bytes": queued_bytes, "max_queued_bytes": self._max_queued_bytes,
                **counts}
