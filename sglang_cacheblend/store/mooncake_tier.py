"""Mooncake Store tier: chunk KV shared by every process attached to one Mooncake master.

Two SGLang servers using the same master see each other's chunks. An entry is the
:mod:`~.codec` bytes of a :class:`~.entry.ChunkKV` under ``cacheblend/v1/<chunk key>``,
verified on every read, so a damaged or misfiled entry is dropped and counted, never served.
Keys are content hashes, so when two processes put one chunk the first value (Mooncake keeps
it: first writer wins) is as right as the second.

The tier degrades, never crashes and never stalls its caller (SGLang's scheduler thread):
every Mooncake call runs on a worker thread (one for reads, one for writes) and the caller
waits at most ``timeout_s``. A call that times out or fails (e.g. -900 when the master is
gone; calls then hang ~4-13 s) logs one warning and marks the tier unavailable: get answers
None and put declines at once (:class:`~.tier.NotStored`, which the store counts), and
availability is retried at most every ``retry_s`` (once that thread is free again). Mooncake keeps nothing across a master restart, so after recovery the
chunks are simply recomputed.

Mooncake's transfer engine listens on ``0.0.0.0``, so the tier only talks to 127.0.0.1 and
only starts inside a private network namespace (:mod:`~.netns`, :mod:`~.mooncake_service`).
"""

from __future__ import annotations

import logging
import os
import queue
import threading
import time
import urllib.parse
from collections.abc import Callable
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass
from typing import Any

from sglang_cacheblend.store import codec
from sglang_cacheblend.store.entry import ChunkKV
from sglang_cacheblend.store.netns import in_private_netns
from sglang_cacheblend.store.tier import NotStored, TierStats

__all__ = ["KEY_PREFIX", "MooncakeStats", "MooncakeTier"]

logger = logging.getLogger(__name__)

KEY_PREFIX = f"cacheblend/v{codec.VERSION}/"
_LOOPBACK = ("127.0.0.1", "localhost")

# Mooncake ErrorCode values (mooncake-store/include/types.h) that are not failures.
_MISSING = {-703, -704, -710, -712}  # replica not ready, object not found, replica not found/gone
_ALREADY_THERE = -705  # object already exists: first writer wins
_LEASED = -706  # object has a lease (a remove right after a put or get)
_REJECTED = {-200: "the store is full", -600: "the entry is larger than local_buffer_bytes"}


@dataclass
class MooncakeStats(TierStats):
    """TierStats plus what a shared, fallible store adds. ``entries``/``bytes`` stay 0: the
    store is shared and evicts by itself; ``capacity_bytes`` is what this process lends."""

    stored: int = 0  # puts that stored the chunk or found it there already
    # rejected (TierStats): puts the store refused (full, larger than the local buffer)
    failures: int = 0  # calls that failed or timed out (each marks the tier unavailable)
    skipped: int = 0  # calls not made because the tier was unavailable
    available: bool = True


class _Lane:
    """One daemon thread running submitted calls in order (daemon: a call stuck in Mooncake
    must not keep the process from exiting), and the call submitted last."""

    def __init__(self, name: str) -> None:
        self._jobs: queue.SimpleQueue = queue.SimpleQueue()
        self.pending: Future | None = None
        threading.Thread(target=self._run, name=name, daemon=True).start()

    def busy(self) -> bool:
        return self.pending is not None and not self.pending.done()

    def submit(self, fn: Callable[..., Any], *args: Any) -> Future:
        future: Future = Future()
        self._jobs.put((future, fn, args))
        self.pending = future
        return future

    def stop(self) -> None:
        self._jobs.put(None)

    def _run(self) -> None:
        while (job := self._jobs.get()) is not None:
            future, fn, args = job
            if future.set_running_or_notify_cancel():
                try:
                    future.set_result(fn(*args))
                except BaseException as exc:  # noqa: BLE001 - handed to the waiting caller
                    future.set_exception(exc)


def _check_loopback(what: str, host: str | None) -> None:
    if host not in _LOOPBACK:
        raise ValueError(f"{what} must be 127.0.0.1 or localhost (Mooncake listens on every "
                         f"interface; run it in a private namespace), got {host!r}")


def _check_port(what: str, port: str | int | None) -> None:
    if not str(port).isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"{what} needs a port in 1..65535, got {port!r}")


class MooncakeTier:
    """Chunk KV in a Mooncake Store whose master is ``master_addr`` (``"127.0.0.1:port"``)
    and metadata server ``metadata_url`` (``"http://127.0.0.1:port/metadata"``).

    ``local_host`` is this process's address (loopback only); ``global_segment_bytes`` the
    memory it lends the store (0: a separate long-lived ``mooncake_client`` holds the store,
    see :class:`~.mooncake_service.MooncakeService`); ``local_buffer_bytes`` bounds the
    largest entry moved (a ~23 MB chunk fits the default); ``timeout_s`` is the most any call
    blocks its caller; ``retry_s`` how long an unavailable tier waits before trying again.
    Needs ``mooncake-transfer-engine-non-cuda`` and ``libibverbs1``, and must run inside a
    private network namespace (RuntimeError otherwise). Sets ``MC_TCP_BIND_ADDRESS=127.0.0.1``
    in this process if unset (ValueError if set to anything else).

    Thread-safe for :class:`~.chunk_store.ChunkStore`'s pattern: one thread reads (get,
    remove) while another writes (put). Reads and writes run on two lanes (a thread each), so
    a get never waits behind a put's encoding or transfer. ``put`` returns ``[]`` or raises
    :class:`~.tier.NotStored`.
    """

    def __init__(self, master_addr: str, metadata_url: str, *, local_host: str = "127.0.0.1",
                 global_segment_bytes: int = 0, local_buffer_bytes: int = 64 << 20,
                 timeout_s: float = 5.0, retry_s: float = 30.0) -> None:
        host, sep, port = master_addr.rpartition(":")
        if not sep:
            raise ValueError(f"master_addr must be 'host:port', got {master_addr!r}")
        _check_loopback("master_addr's host", host)
        _check_port("master_addr", port)
        url = urllib.parse.urlsplit(metadata_url)
        if url.scheme != "http":
            raise ValueError(f"metadata_url must be an http:// URL, got {metadata_url!r}")
        _check_loopback("metadata_url's host", url.hostname)
        _check_port("metadata_url", url.port)
        _check_loopback("local_host", local_host)
        for name, value in (("global_segment_bytes", global_segment_bytes),
                            ("local_buffer_bytes", local_buffer_bytes)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"{name} must be an int >= 0, got {value!r}")
        if not timeout_s > 0 or not retry_s >= 0:
            raise ValueError(f"timeout_s must be > 0 and retry_s >= 0, got {timeout_s}, {retry_s}")
        if os.environ.get("MC_TCP_BIND_ADDRESS", "127.0.0.1") != "127.0.0.1":
            raise ValueError(f"MC_TCP_BIND_ADDRESS is {os.environ['MC_TCP_BIND_ADDRESS']!r}; "
                             f"the tier only binds 127.0.0.1")
        reason = in_private_netns()
        if reason is not None:
            raise RuntimeError(f"MooncakeTier runs only inside a private network namespace "
                               f"({reason})")
        os.environ["MC_TCP_BIND_ADDRESS"] = "127.0.0.1"  # read when the client is set up
        try:
            from mooncake.store import MooncakeDistributedStore
        except ImportError as exc:
            raise ImportError("MooncakeTier needs mooncake-transfer-engine-non-cuda (pip "
                              "install 'sglang-cacheblend[mooncake]') and libibverbs1 "
                              f"(apt-get install -y libibverbs1): {exc}") from exc
        self._new_store = MooncakeDistributedStore
        self._setup_args = (local_host, metadata_url, global_segment_bytes, local_buffer_bytes,
                            "tcp", "", master_addr)
        self._buffer_bytes = local_buffer_bytes
        self._timeout = timeout_s
        self._retry_s = retry_s
        # Guards everything below it; never held while waiting on Mooncake.
        self._lock = threading.Lock()
        self._stats = MooncakeStats(capacity_bytes=global_segment_bytes)
        self._available = True
        self._retry_at = 0.0
        self._damaged: set[str] = set()  # keys whose damaged entry may still be stored
        self._store: Any = None  # set up on first use, under _connect_lock
        self._connect_lock = threading.Lock()
        # Reads and writes run on separate lanes, so a get never waits behind a put's I/O.
        self._reads, self._writes = _Lane("mooncake-tier-read"), _Lane("mooncake-tier-write")
        self._call(self._reads, "connecting", lambda store: 0)

    # --- calls, bounded in time --------------------------------------------------------------

    def _call(self, lane: _Lane, what: str, job: Callable[[Any], Any]) -> Any:
        """``job(store)`` on ``lane`` (connecting first if needed); its result, or None if the
        tier is unavailable, the call failed or ``timeout_s`` passed."""
        with self._lock:
            if not self._available and (time.monotonic() < self._retry_at or lane.busy()):
                self._stats.skipped += 1
                return None
        future = lane.submit(self._connected, job)
        try:
            result = future.result(timeout=self._timeout)
        except FutureTimeout:
            self._fail(f"{what} took longer than {self._timeout:g} s")
            return None
        except Exception as exc:  # noqa: BLE001 - degrade, never crash the scheduler
            self._fail(f"{what} failed: {exc}")
            return None
        with self._lock:
            if not self._available:
                logger.info("Mooncake tier is available again (chunks stored before the "
                            "outage may be gone)")
                self._available = self._stats.available = True
        return result

    def _connected(self, job: Callable[[Any], Any]) -> Any:
        """Lane side: set the client up once, then run ``job``."""
        with self._connect_lock:
            if self._store is None:
                store = self._new_store()
                code = store.setup(*self._setup_args)
                if code != 0:
                    raise RuntimeError(f"setup returned {code}")
                self._store = store
            store = self._store
        return job(store)

    def _fail(self, why: str) -> None:
        with self._lock:
            self._stats.failures += 1
            self._retry_at = time.monotonic() + self._retry_s
            if self._available:
                logger.warning("Mooncake tier unavailable: %s; chunks are recomputed instead, "
                               "retrying at most every %g s", why, self._retry_s)
                self._available = self._stats.available = False
            else:
                logger.debug("Mooncake tier still unavailable: %s", why)

    @staticmethod
    def _name(key: str) -> str:
        if not key or not all(c in "0123456789abcdef" for c in key):
            raise ValueError(f"Mooncake tier keys are lowercase hex digests, got {key!r}")
        return KEY_PREFIX + key

    # --- KVTier ------------------------------------------------------------------------------

    def get(self, key: str) -> ChunkKV | None:
        """The chunk under ``key``, verified; None on a miss, a damaged entry (dropped) or an
        unavailable store. Blocks at most ``timeout_s``; never waits behind a put."""
        name = self._name(key)

        def job(store: Any) -> tuple[int, ChunkKV | None, str | None]:
            size = store.get_size(name)
            if size < 0:
                return size, None, None
            data = store.get(name)
            if not data:  # removed or evicted since, or its replica is not ready yet
                return -704, None, None
            try:
                return 0, codec.decode(key, data), None
            except ValueError as exc:
                with self._lock:
                    self._damaged.add(key)  # put replaces it, should this remove fail (-706)
                store.remove(name)
                return 0, None, str(exc)

        result = self._call(self._reads, "get", job)
        code, kv, damage = (0, None, None) if result is None else result
        if code < 0 and code not in _MISSING:
            self._fail(f"get returned {code}")
        if damage is not None:
            logger.warning("Mooncake entry %s is unusable (%s); dropped, the chunk is "
                           "recomputed", name, damage)
        with self._lock:
            self._stats.dropped += damage is not None
            self._stats.hits += kv is not None
            self._stats.misses += kv is None
        return kv

    def put(self, key: str, kv: ChunkKV) -> list[tuple[str, ChunkKV]]:
        """Store ``kv`` unless the store has the chunk already. Blocks at most ``timeout_s``.
        Returns ``[]``: Mooncake evicts by itself. Raises :class:`NotStored` when the store
        is unavailable, full, or the entry exceeds ``local_buffer_bytes`` (the caller counts
        and logs it)."""
        name = self._name(key)

        def job(store: Any) -> int:
            with self._lock:
                replace = key in self._damaged
            if not replace:
                present = store.is_exist(name)
                if present != 0:
                    return 0 if present == 1 else present
            data = codec.encode(key, kv)
            if len(data) > self._buffer_bytes:
                return -600
            code = store.upsert(name, data) if replace else store.put(name, data)
            if code == 0 and replace:
                with self._lock:
                    self._damaged.discard(key)
            return code

        code = self._call(self._writes, "put", job)
        if code is None:
            raise NotStored("the Mooncake tier is unavailable")
        if code < 0 and code not in _REJECTED and code != _ALREADY_THERE:
            self._fail(f"put returned {code}")
            raise NotStored(f"Mooncake put returned {code}")
        with self._lock:
            if code in _REJECTED:
                self._stats.rejected += 1
            else:
                self._stats.stored += 1
        if code in _REJECTED:
            raise NotStored(f"{_REJECTED[code]} ({code}); a chunk of {kv.nbytes} bytes")
        return []

    def remove(self, key: str) -> bool:
        """Drop ``key``; whether it was removed (False too while its lease runs, -706)."""
        name = self._name(key)
        code = self._call(self._reads, "remove", lambda store: store.remove(name))
        if code is None:
            return False
        if code < 0 and code not in _MISSING and code != _LEASED:
            self._fail(f"remove returned {code}")
        return code == 0

    def stats(self) -> MooncakeStats:
        with self._lock:
            return MooncakeStats(**vars(self._stats))

    def close(self, drain_s: float = 15.0) -> None:
        """Detach from the store and stop the lanes' threads (at shutdown, not per request).

        Calls still hanging on a dead master are given up to ``drain_s`` to end first (they
        end within ~13 s), so the client is closed and released on a lane, not torn down
        under a running call when the process exits.
        """
        deadline = time.monotonic() + drain_s
        for lane in (self._reads, self._writes):
            if lane.busy():
                try:
                    lane.pending.exception(timeout=max(0.0, deadline - time.monotonic()))
                except FutureTimeout:
                    pass
        if self._reads.busy() or self._writes.busy():
            logger.warning("Mooncake tier: a call still hangs after %g s; the client is not "
                           "closed", drain_s)
        else:
            try:
                self._reads.submit(self._release).result(timeout=self._timeout)
            except Exception as exc:  # noqa: BLE001 - closing a broken client is best effort
                logger.debug("Mooncake tier close: %s", exc)
        self._reads.stop()
        self._writes.stop()
        with self._lock:
            self._available = self._stats.available = False
            self._retry_at = float("inf")

    def _release(self) -> None:
        """Lane side: close the client and drop it here, while the process still runs."""
        with self._connect_lock:
            store, self._store = self._store, None
        if store is not None:
            store.close()
