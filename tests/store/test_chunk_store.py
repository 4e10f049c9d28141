"""The tier chain: where spills and write-throughs land, lookup order, the writer thread."""

from __future__ import annotations

import logging
import threading
import time

import pytest
import torch

from sglang_cacheblend.store import ChunkKV, ChunkStore, DiskTier, HostTier
from sglang_cacheblend.store.config import StoreConfig, build_store


def kv(seed: int, tokens: int = 4) -> ChunkKV:
    gen = torch.Generator().manual_seed(seed)
    return ChunkKV(k=torch.randn(2, tokens, 1, 4, generator=gen),
                   v=torch.randn(2, tokens, 1, 4, generator=gen),
                   positions=torch.arange(1, tokens + 1),
                   token_ids=torch.arange(seed, seed + tokens))


def same(a: ChunkKV, b: ChunkKV) -> bool:
    return all(torch.equal(getattr(a, f), getattr(b, f))
               for f in ("k", "v", "positions", "token_ids"))


ONE = kv(0).nbytes


def test_write_through_lands_on_disk_and_host_gets_only_spills(tmp_path):
    store = ChunkStore(host=HostTier(2 * ONE), persistent=[("disk", DiskTier(tmp_path, 10 * ONE))])
    store.persist("aa", kv(1))
    assert store.flush(10)
    assert store.stats()["tiers"]["host"]["entries"] == 0
    assert store.stats()["tiers"]["disk"]["entries"] == 1
    hit = store.get("aa")
    assert hit.tier == "disk" and same(hit.kv, kv(1))
    store.spill("bb", kv(2))
    hit = store.get("bb")
    assert hit.tier == "host" and same(hit.kv, kv(2))
    assert store.get("bb") is None  # a host hit moves the chunk back to the pool
    store.close()


def test_spill_policy_sends_host_evictions_to_disk(tmp_path):
    store = ChunkStore(host=HostTier(2 * ONE), persistent=[("disk", DiskTier(tmp_path, 10 * ONE))],
                       policy="spill")
    store.persist("aa", kv(1))  # not written through under "spill"
    assert store.flush(10) and store.get("aa") is None
    for i, key in enumerate(("a1", "a2", "a3")):  # the host tier holds two: a1 falls to disk
        store.spill(key, kv(10 + i))
    assert store.flush(10)
    stats = store.stats()
    assert stats["tiers"]["host"]["entries"] == 2 and stats["tiers"]["disk"]["entries"] == 1
    assert stats["spills"] == 3
    assert store.get("a1").tier == "disk" and same(store.get("a1").kv, kv(10))
    assert store.get("a3").tier == "host"
    store.close()


class SlowTier:
    """A persistent tier whose puts wait for a signal (a slow disk)."""

    def __init__(self) -> None:
        self.started = threading.Event()
        self.release = threading.Event()
        self.entries: dict[str, ChunkKV] = {}

    def get(self, key):
        return self.entries.get(key)

    def put(self, key, value):
        self.started.set()
        assert self.release.wait(10)
        if key == "bad":
            raise OSError("disk full")
        self.entries[key] = value
        return []

    def remove(self, key):
        return self.entries.pop(key, None) is not None

    def stats(self):
        from sglang_cacheblend.store import TierStats

        return TierStats(entries=len(self.entries))


def test_queued_writes_are_served_bounded_and_failures_counted():
    slow = SlowTier()
    store = ChunkStore(persistent=[("disk", slow)], max_queued_writes=2)
    store.persist("bad", kv(0))
    assert slow.started.wait(10)
    for key, seed in (("k1", 1), ("k2", 2), ("k3", 3)):
        store.persist(key, kv(seed))
    # The writer holds "bad"; k1 and k2 wait in the queue; k3 found it full and was skipped.
    hit = store.get("k2")
    assert hit is not None and hit.tier == "disk" and same(hit.kv, kv(2))
    assert store.get("k3") is None
    assert store.stats()["skipped_writes"] == 1
    slow.release.set()
    assert store.flush(10)
    stats = store.stats()
    assert stats["failed_writes"] == 1 and stats["queued_writes"] == 0
    assert stats["unstored_writes"] == 2 and stats["stored_writes"] == 2  # k3 skipped, bad failed
    assert sorted(slow.entries) == ["k1", "k2"]
    store.close()


def test_config_builds_the_tiers_and_refuses_non_loopback(tmp_path):
    assert build_store(StoreConfig()) is None
    store = build_store(StoreConfig(host_mb=1, disk_dir=str(tmp_path)))
    assert store.tier_names == ["host", "disk"] and store.writes_through and store.takes_spills
    store.close()
    disk_only = build_store(StoreConfig(disk_dir=str(tmp_path)))
    assert not disk_only.takes_spills  # written through already: evictions are not copied out
    disk_only.close()
    spill_only = build_store(StoreConfig(disk_dir=str(tmp_path), policy="spill"))
    assert spill_only.takes_spills and not spill_only.writes_through
    spill_only.close()
    with pytest.raises(ValueError, match="loopback"):
        StoreConfig(mooncake_master="10.1.2.3:50051", mooncake_metadata="http://10.1.2.3/m")
    with pytest.raises(ValueError, match="go together"):
        StoreConfig(mooncake_master="127.0.0.1:50051")
    with pytest.raises(ValueError, match="policy"):
        StoreConfig(policy="write-back")
    with pytest.raises(ValueError, match="at least one tier"):
        ChunkStore()


# --- faults (review 2: G6-G9, G13) --------------------------------------------------------------

class RaisingTier(SlowTier):
    """A tier whose reads raise (a file of another user, a vanished file, a broken backend)."""

    def get(self, key):
        raise PermissionError(13, "Permission denied")

    def remove(self, key):
        raise PermissionError(13, "Permission denied")


def test_a_tier_whose_read_raises_is_a_miss_and_the_next_tier_is_asked(tmp_path):
    disk = DiskTier(tmp_path, 10 * ONE)
    disk.put("aa", kv(1))
    store = ChunkStore(host=RaisingTier(), persistent=[("broken", RaisingTier()),
                                                       ("disk", disk)])
    hit = store.get("aa")
    assert hit is not None and hit.tier == "disk" and same(hit.kv, kv(1))
    assert store.get("bb") is None
    assert store.stats()["read_errors"] == 4  # host and "broken", for each key
    store.close()


def test_the_writer_queue_is_bounded_in_bytes(tmp_path):
    slow = SlowTier()
    store = ChunkStore(persistent=[("disk", slow)], max_queued_bytes=2 * ONE + ONE // 2)
    store.persist("k0", kv(0))
    assert slow.started.wait(10)  # the writer holds k0; it counts until written
    store.persist("k1", kv(1))
    store.persist("k2", kv(2))  # 3 chunks would pass 2.5 chunks' bytes: skipped
    stats = store.stats()
    assert (stats["queued_writes"], stats["queued_bytes"]) == (2, 2 * ONE)
    assert stats["skipped_writes"] == stats["unstored_writes"] == 1
    assert store.get("k2") is None
    slow.release.set()
    assert store.flush(10) and store.stats()["queued_bytes"] == 0
    big = kv(3, tokens=64)  # larger than the bound: taken when the queue is empty
    assert big.nbytes > 2 * ONE + ONE // 2
    store.persist("k3", big)
    assert store.flush(10) and sorted(slow.entries) == ["k0", "k1", "k3"]
    assert store.stats()["stored_writes"] == 3
    store.check_integrity()
    store.close()


def test_writes_not_stored_are_counted_and_logged_once_a_minute(tmp_path, caplog):
    """A chunk larger than the disk tier, and writes that fail: the store's stats tell a client
    that they were not stored, and the log says so without a line per write."""
    store = ChunkStore(persistent=[("disk", DiskTier(tmp_path, 3 * ONE))])  # one small chunk
    with caplog.at_level(logging.WARNING, logger="sglang_cacheblend.store.chunk_store"):
        for i in range(6):
            store.persist(f"b{i}", kv(i, tokens=16))  # each more than the whole tier
        assert store.flush(10)
    stats = store.stats()
    assert stats["rejected_writes"] == stats["unstored_writes"] == 6
    assert stats["stored_writes"] == 0 and stats["tiers"]["disk"]["rejected"] == 6
    warnings = [r.getMessage() for r in caplog.records]
    assert len(warnings) == 1 and "larger than the disk tier" in warnings[0], warnings
    store.persist("c1", kv(1))
    assert store.flush(10) and store.stats()["stored_writes"] == 1
    assert store.stats()["unstored_writes"] == 6
    store.check_integrity()
    store.close()


def test_a_host_hit_given_back_unused_stays_in_host_ram(tmp_path):
    store = ChunkStore(host=HostTier(2 * ONE), persistent=[("disk", DiskTier(tmp_path, 10 * ONE))])
    store.spill("aa", kv(1))
    hit = store.get("aa")
    assert hit.tier == "host" and store.stats()["tiers"]["host"]["entries"] == 0
    store.give_back("aa", hit.kv, hit.tier)  # e.g. it did not fit the pool
    again = store.get("aa")
    assert again.tier == "host" and same(again.kv, kv(1))
    store.persist("bb", kv(2))
    assert store.flush(10)
    disk_hit = store.get("bb")
    store.give_back("bb", disk_hit.kv, disk_hit.tier)  # still on disk: nothing to do
    stats = store.stats()
    assert stats["tiers"]["host"]["entries"] == 0 and stats["given_back"] == 1
    assert stats["spills"] == 1
    store.close()


def test_close_returns_in_time_when_a_write_hangs():
    """A writer stuck in a write (a hung network file system) with a full queue: close gives up
    after its timeout instead of blocking the process's exit."""
    slow = SlowTier()
    store = ChunkStore(persistent=[("disk", slow)], max_queued_writes=1)
    store.persist("k0", kv(0))
    assert slow.started.wait(10)
    store.persist("k1", kv(1))  # the queue is full now
    closer = threading.Thread(target=store.close, args=(0.5,), daemon=True)
    started = time.monotonic()
    closer.start()
    closer.join(10)
    assert not closer.is_alive() and time.monotonic() - started < 5
    store.persist("k2", kv(2))  # closed: skipped, counted
    assert store.stats()["skipped_writes"] == 1
    slow.release.set()
