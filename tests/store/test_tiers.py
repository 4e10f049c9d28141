"""Host-RAM and disk tiers of the KV Cache Store: bounded, LRU, and the disk tier never serves
a damaged, foreign or truncated entry."""

from __future__ import annotations

import pytest
import torch

from radix_ext import ChunkNamespace
from sglang_cacheblend.store import ChunkKV, DiskTier, HostTier, chunk_key, disk_tier


def make_kv(n: int = 5, seed: int = 0, dtype: torch.dtype = torch.bfloat16) -> ChunkKV:
    gen = torch.Generator().manual_seed(seed)
    shape = (3, n, 2, 4)
    return ChunkKV(torch.randn(shape, generator=gen).to(dtype),
                   torch.randn(shape, generator=gen).to(dtype),
                   torch.arange(1, n + 1), torch.randint(0, 1000, (n,), generator=gen))


def same(a: ChunkKV, b: ChunkKV) -> bool:
    return all(torch.equal(getattr(a, f), getattr(b, f)) for f in ("k", "v", "positions",
                                                                     "token_ids"))


def test_keys_separate_namespaces_and_are_stable():
    ids = [5, 6, 7]
    a = ChunkNamespace("m", cache_salt="t1")
    assert chunk_key(a, ids) == chunk_key(ChunkNamespace("m", cache_salt="t1"), torch.tensor(ids))
    assert chunk_key(a, ids) != chunk_key(ChunkNamespace("m", cache_salt="t2"), ids)
    assert chunk_key(a, ids) != chunk_key(a, [5, 6, 8])
    assert len(chunk_key(a, ids)) == 64


def test_chunk_kv_checks_its_shapes():
    kv = make_kv()
    with pytest.raises(ValueError, match="positions"):
        ChunkKV(kv.k, kv.v, kv.positions[:2], kv.token_ids)
    with pytest.raises(ValueError, match="equal-shaped"):
        ChunkKV(kv.k, kv.v[:, :2], kv.positions, kv.token_ids)


def test_host_tier_is_lru_bounded_in_bytes_and_hands_back_what_it_evicts():
    size = make_kv().nbytes
    tier = HostTier(capacity_bytes=2 * size)
    for key in ("a", "b"):
        assert tier.put(key, make_kv(seed=ord(key))) == []
    assert tier.get("a") is not None  # "b" is now the least recently used
    evicted = tier.put("c", make_kv(seed=3))
    assert [key for key, _ in evicted] == ["b"] and same(evicted[0][1], make_kv(seed=ord("b")))
    assert tier.get("b") is None and tier.get("c") is not None
    stats = tier.stats()
    assert (stats.entries, stats.bytes, stats.evictions) == (2, 2 * size, 1)
    assert (stats.hits, stats.misses) == (2, 1)
    assert [k for k, _ in HostTier(size - 1).put("big", make_kv())] == ["big"]  # never fits


def test_disk_tier_round_trips_and_survives_a_restart(tmp_path):
    tier = DiskTier(tmp_path, capacity_bytes=10**6)
    kv = make_kv(dtype=torch.bfloat16)
    key = chunk_key(ChunkNamespace("m"), kv.token_ids)
    tier.put(key, kv)
    assert same(tier.get(key), kv)
    tier.close()
    restarted = DiskTier(tmp_path, capacity_bytes=10**6)
    assert same(restarted.get(key), kv) and restarted.stats().entries == 1
    assert list(tmp_path.glob(".*.tmp")) == []  # written atomically, nothing left behind
    restarted.check_integrity()
    restarted.close()


@pytest.mark.parametrize("damage", ["flip a byte", "truncate", "foreign version", "other key"])
def test_disk_tier_drops_damaged_entries_instead_of_serving_them(tmp_path, damage, monkeypatch):
    tier = DiskTier(tmp_path, capacity_bytes=10**6)
    kv = make_kv(n=16, dtype=torch.float32)
    key, other = "ab" * 32, "cd" * 32
    if damage == "foreign version":
        monkeypatch.setattr(disk_tier, "VERSION", "0")
    tier.put(other if damage == "other key" else key, kv)
    monkeypatch.setattr(disk_tier, "VERSION", "1")
    path = tmp_path / f"{key}.safetensors"
    if damage == "other key":
        (tmp_path / f"{other}.safetensors").rename(path)
        tier.close()
        tier = DiskTier(tmp_path, capacity_bytes=10**6)
    raw = bytearray(path.read_bytes())
    if damage == "flip a byte":
        raw[-7] ^= 0xFF  # inside the last tensor's data
    elif damage == "truncate":
        raw = raw[: len(raw) // 2]
    path.write_bytes(bytes(raw))
    assert tier.get(key) is None
    assert not path.exists() and tier.stats().dropped == 1 and tier.stats().entries == 0
    tier.check_integrity()
    tier.close()


def test_disk_tier_evicts_the_least_recently_used_files(tmp_path):
    size = None
    tier = DiskTier(tmp_path, capacity_bytes=10**9)
    tier.put("aa", make_kv(seed=1))
    size = tier.stats().bytes
    tier.close()
    tier = DiskTier(tmp_path, capacity_bytes=2 * size)
    tier.put("bb", make_kv(seed=2))
    tier.get("aa")  # "bb" becomes the oldest
    tier.put("cc", make_kv(seed=3))
    assert sorted(p.stem for p in tmp_path.glob("*.safetensors")) == ["aa", "cc"]
    assert tier.stats().evictions == 1 and tier.get("bb") is None
    with pytest.raises(ValueError, match="hex"):
        tier.get("../etc/passwd")
    tier.check_integrity()
    tier.close()
