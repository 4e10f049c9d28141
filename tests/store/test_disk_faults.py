"""The disk tier under faults: a disk that fills before the capacity, a second owner of the
folder, files it cannot touch or that vanish, private files (review 2: G4, G5, G6, G8, G11,
G13, G14). Full disks are fakes (a file-system size in bytes), as no small tmpfs is at hand."""

from __future__ import annotations

import errno
import logging
import os
import pathlib
import re
import stat

import pytest
import torch

from sglang_cacheblend.store import ChunkKV, DiskTier, codec, disk_folder, disk_tier
from sglang_cacheblend.store.tier import NotStored


def make_kv(seed: int = 0, n: int = 5) -> ChunkKV:
    gen = torch.Generator().manual_seed(seed)
    shape = (3, n, 2, 4)
    return ChunkKV(torch.randn(shape, generator=gen).to(torch.bfloat16),
                   torch.randn(shape, generator=gen).to(torch.bfloat16),
                   torch.arange(1, n + 1), torch.randint(0, 1000, (n,), generator=gen))


def same(a: ChunkKV, b: ChunkKV) -> bool:
    return all(torch.equal(getattr(a, f), getattr(b, f))
               for f in ("k", "v", "positions", "token_ids"))


KEYS = [f"{i:02x}" * 32 for i in range(8)]
ONE = len(codec.encode(KEYS[0], make_kv()))  # every entry here encodes to this many bytes


def stored(root: pathlib.Path) -> list[str]:
    return sorted(p.name.removesuffix(".safetensors") for p in root.glob("*.safetensors"))


def temporaries(root: pathlib.Path) -> list[str]:
    return sorted(p.name for p in root.glob(".*.tmp"))


class SmallDisk:
    """A file system of ``size`` bytes holding ``root``: a write past it writes what fits and
    raises ENOSPC, as a real one does, leaving the partial file. ``honest``: whether the
    free space it reports is true (a shared disk's free space can change under a writer)."""

    def __init__(self, root: pathlib.Path, size: int, monkeypatch, *, honest: bool) -> None:
        self.root, self.size, self.enospc = root, size, 0
        self._write = disk_folder.write_private
        monkeypatch.setattr(disk_folder, "write_private", self.write)
        monkeypatch.setattr(disk_folder, "free_bytes",
                            self.free if honest else lambda root: 1 << 40)
        monkeypatch.setattr(disk_tier, "FREE_RESERVE_BYTES", 0)

    def used(self) -> int:
        return sum(p.stat().st_size for p in self.root.iterdir())

    def free(self, root=None) -> int:
        return max(0, self.size - self.used())

    def write(self, path, data) -> None:
        room = self.free()
        if len(data) > room:
            self._write(path, data[:room])
            self.enospc += 1
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
        self._write(path, data)


# --- G4: a full disk ----------------------------------------------------------------------------

def test_a_disk_that_fills_before_the_capacity_evicts_and_writes_again(tmp_path, monkeypatch):
    """The file system holds three entries, the tier may hold a hundred, and the free space the
    tier reads is stale: each write past three hits ENOSPC, evicts the oldest and retries."""
    disk = SmallDisk(tmp_path, 3 * ONE + 64, monkeypatch, honest=False)
    tier = DiskTier(tmp_path, capacity_bytes=100 * ONE)
    for seed, key in enumerate(KEYS):
        assert tier.put(key, make_kv(seed)) == []
    assert disk.enospc == len(KEYS) - 3
    assert stored(tmp_path) == sorted(KEYS[-3:]) and temporaries(tmp_path) == []
    assert same(tier.get(KEYS[-1]), make_kv(len(KEYS) - 1))
    assert tier.stats().evictions == len(KEYS) - 3
    tier.check_integrity()
    tier.close()


def test_after_a_restart_on_a_full_disk_writes_evict_first(tmp_path, monkeypatch, caplog):
    """A folder left full by the last run: the tier warns at startup that the disk is smaller
    than its capacity, and its next write evicts for the space before writing (no ENOSPC)."""
    disk = SmallDisk(tmp_path, 3 * ONE + 64, monkeypatch, honest=True)
    first = DiskTier(tmp_path, capacity_bytes=100 * ONE)
    for seed, key in enumerate(KEYS[:3]):
        first.put(key, make_kv(seed))
    first.close()
    with caplog.at_level(logging.WARNING, logger=disk_tier.__name__):
        tier = DiskTier(tmp_path, capacity_bytes=100 * ONE)
    assert "file system has room" in caplog.text
    tier.put(KEYS[3], make_kv(3))
    assert disk.enospc == 0 and stored(tmp_path) == sorted(KEYS[1:4])
    tier.check_integrity()
    tier.close()


def test_a_write_evicts_before_it_writes(tmp_path, monkeypatch):
    """At the capacity, the oldest file goes before the new one is written, so the folder
    never holds more than the capacity (plus nothing)."""
    seen = []
    real = disk_folder.write_private

    def counting(path, data):
        seen.append(len(stored(tmp_path)))
        real(path, data)

    monkeypatch.setattr(disk_folder, "write_private", counting)
    tier = DiskTier(tmp_path, capacity_bytes=2 * ONE)
    for seed, key in enumerate(KEYS[:5]):
        tier.put(key, make_kv(seed))
    assert seen == [0, 1, 1, 1, 1] and stored(tmp_path) == sorted(KEYS[3:5])
    tier.close()


@pytest.mark.parametrize("error", [errno.EIO, errno.ENOSPC])
def test_a_failed_write_leaves_no_temporary_file_and_the_tier_goes_on(tmp_path, monkeypatch,
                                                                       error):
    """EIO, or ENOSPC with nothing of the tier's left to evict (another program filled the
    disk): the write raises, its partial file is gone, and once the disk is fine the tier
    writes again."""
    real = disk_folder.write_private

    def broken(path, data):
        real(path, data[: len(data) // 2])
        raise OSError(error, os.strerror(error), str(path))

    tier = DiskTier(tmp_path, capacity_bytes=100 * ONE)
    monkeypatch.setattr(disk_folder, "write_private", broken)
    with pytest.raises(OSError) as raised:
        tier.put(KEYS[0], make_kv(0))
    assert raised.value.errno == error
    assert temporaries(tmp_path) == [] and stored(tmp_path) == []
    monkeypatch.setattr(disk_folder, "write_private", real)
    tier.put(KEYS[0], make_kv(0))
    assert same(tier.get(KEYS[0]), make_kv(0))
    tier.check_integrity()
    tier.close()


# --- G8: nothing dropped silently ---------------------------------------------------------------

def test_a_chunk_larger_than_the_tier_is_declined_and_counted(tmp_path):
    tier = DiskTier(tmp_path, capacity_bytes=ONE - 1)
    with pytest.raises(NotStored, match="larger than the disk tier"):
        tier.put(KEYS[0], make_kv(0))
    assert tier.stats().rejected == 1 and stored(tmp_path) == []
    tier.close()


# --- G5, G14: one owner per folder --------------------------------------------------------------

def test_a_second_tier_on_the_same_folder_is_refused_naming_it(tmp_path):
    tier = DiskTier(tmp_path, capacity_bytes=10 * ONE)
    with pytest.raises(RuntimeError, match=re.escape(str(tmp_path)) + ".*in use"):
        DiskTier(tmp_path, capacity_bytes=10 * ONE)
    tier.put(KEYS[0], make_kv(0))  # the owner is unaffected
    tier.close()
    successor = DiskTier(tmp_path, capacity_bytes=10 * ONE)  # closed: the folder is free
    assert same(successor.get(KEYS[0]), make_kv(0))
    successor.close()


def test_temporary_names_are_unique_and_only_stale_ones_of_ours_are_removed(tmp_path,
                                                                             monkeypatch):
    ours = [f".{KEYS[0]}.{'ab' * 16}.tmp", f".{KEYS[1]}.4242.139872.tmp"]  # new, old format
    theirs = [".another-program.tmp", "notes.txt", "model.safetensors"]
    for name in ours + theirs:
        (tmp_path / name).write_bytes(b"x")
    names = []
    real = disk_folder.write_private

    def recording(path, data):
        names.append(path.name)
        real(path, data)

    monkeypatch.setattr(disk_folder, "write_private", recording)
    tier = DiskTier(tmp_path, capacity_bytes=ONE)  # room for one: every put evicts
    assert all(not (tmp_path / name).exists() for name in ours)
    for seed in range(3):
        tier.put(KEYS[2], make_kv(seed))
        tier.put(KEYS[3], make_kv(seed))
    assert len(set(names)) == len(names) == 6
    assert all(re.fullmatch(r"\.[0-9a-f]{64}\.[0-9a-f]{32}\.tmp", n) for n in names)
    assert all((tmp_path / name).exists() for name in theirs)  # never indexed, never evicted
    assert stored(tmp_path) == sorted(["model", KEYS[3]])
    tier.check_integrity()
    tier.close()


def test_a_file_that_vanishes_while_the_tier_starts_is_skipped(tmp_path):
    """A file listed, then gone before its stat (another program deleted it): the constructor
    goes on without it."""
    (tmp_path / f"{KEYS[0]}.safetensors").symlink_to(tmp_path / "gone")
    tier = DiskTier(tmp_path, capacity_bytes=10 * ONE)
    assert tier.stats().entries == 0 and tier.get(KEYS[0]) is None
    tier.close()


def test_a_lowered_capacity_evicts_the_oldest_at_startup(tmp_path):
    tier = DiskTier(tmp_path, capacity_bytes=10 * ONE)
    for seed, key in enumerate(KEYS[:5]):
        tier.put(key, make_kv(seed))
        os.utime(tmp_path / f"{key}.safetensors", (1000 + seed, 1000 + seed))
    tier.close()
    smaller = DiskTier(tmp_path, capacity_bytes=2 * ONE)
    assert stored(tmp_path) == sorted(KEYS[3:5]) and smaller.stats().evictions == 3
    smaller.check_integrity()
    smaller.close()


# --- G6: files the tier cannot touch ------------------------------------------------------------

def test_a_file_whose_time_cannot_be_set_is_still_served(tmp_path, monkeypatch):
    """utime needs ownership: another user's readable file raises PermissionError there."""
    tier = DiskTier(tmp_path, capacity_bytes=10 * ONE)
    tier.put(KEYS[0], make_kv(0))

    def refused(*args, **kwargs):
        raise PermissionError(errno.EPERM, "Operation not permitted")

    monkeypatch.setattr(os, "utime", refused)
    assert same(tier.get(KEYS[0]), make_kv(0))
    tier.close()


def test_a_damaged_file_that_cannot_be_deleted_is_forgotten_without_raising(tmp_path,
                                                                             monkeypatch):
    tier = DiskTier(tmp_path, capacity_bytes=10 * ONE)
    tier.put(KEYS[0], make_kv(0))
    path = tmp_path / f"{KEYS[0]}.safetensors"
    path.write_bytes(path.read_bytes()[:100])

    def refused(self, missing_ok=False):
        raise PermissionError(errno.EACCES, "Permission denied", str(self))

    monkeypatch.setattr(pathlib.Path, "unlink", refused)
    assert tier.get(KEYS[0]) is None  # no raise
    assert tier.stats().entries == 0 and tier.stats().dropped == 1
    assert tier.get(KEYS[0]) is None and tier.remove(KEYS[0]) is False
    tier.check_integrity()
    tier.close()


def test_a_file_deleted_by_hand_is_a_miss_not_damage(tmp_path):
    tier = DiskTier(tmp_path, capacity_bytes=10 * ONE)
    tier.put(KEYS[0], make_kv(0))
    (tmp_path / f"{KEYS[0]}.safetensors").unlink()
    assert tier.get(KEYS[0]) is None
    stats = tier.stats()
    assert (stats.entries, stats.bytes, stats.dropped, stats.misses) == (0, 0, 0, 1)
    tier.close()


# --- G11: private at rest -----------------------------------------------------------------------

def test_the_folder_and_its_files_are_private(tmp_path):
    old = os.umask(0o022)
    try:
        root = tmp_path / "tier"
        tier = DiskTier(root, capacity_bytes=10 * ONE)
        tier.put(KEYS[0], make_kv(0))
        tier.close()
        legacy = root / f"{KEYS[1]}.safetensors"  # written world-readable by an older version
        legacy.write_bytes(codec.encode(KEYS[1], make_kv(1)))
        legacy.chmod(0o644)
        DiskTier(root, capacity_bytes=10 * ONE).close()
    finally:
        os.umask(old)
    assert stat.S_IMODE(root.stat().st_mode) == 0o700
    for path in root.iterdir():
        assert stat.S_IMODE(path.stat().st_mode) == 0o600, path
