"""The disk tier's folder: owned by one tier at a time, private to its user, and its free space.

Ownership: a tier takes an exclusive ``flock`` on a lock file in the folder for as long as it
runs. A second tier on the same folder (another server, or a second data-parallel rank of the
same one) would keep its own index of the files, evict the first's files under it, delete its
temporary files at startup and so double the capacity on disk; it is refused instead, with the
folder named. The kernel drops the lock when the owner exits, however it exits, so a crash never
leaves the folder locked. With the lock held, every temporary file of ours in the folder is a
write cut off by a crash, and the owner may delete it.

Privacy: chunk files hold a tenant's token ids in plaintext (and KV that can be inverted), so
the folder is created 0700 and every file 0600. The files' BLAKE2b checksum (:mod:`~.codec`)
detects accidental damage only: anyone who can write the folder can also write a valid
checksum, so the folder's permissions are what keeps forged KV out.
"""

from __future__ import annotations

import errno
import fcntl
import logging
import os
import re
import shutil
import stat
import uuid
from collections.abc import Iterator
from pathlib import Path

__all__ = ["LOCK_NAME", "OwnedFolder", "free_bytes", "write_private"]

logger = logging.getLogger(__name__)

LOCK_NAME = ".cacheblend-disk-tier.lock"
# ".{key}.{uuid4 hex}.tmp"; older versions wrote ".{key}.{pid}.{thread id}.tmp".
_TEMPORARY = re.compile(r"\.[0-9a-f]+(\.[0-9a-f]+)+\.tmp")
_HEX = re.compile(r"[0-9a-f]+")


def write_private(path: Path, data: bytes) -> None:
    """Write ``data`` to a new file at ``path``, readable by its owner only (0600).

    Raises ``OSError`` as the file system does (ENOSPC when full, leaving a partial file that
    the caller deletes; EEXIST if ``path`` exists).
    """
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
    finally:
        os.close(fd)


def free_bytes(root: Path) -> int:
    """Bytes an unprivileged writer may still write on ``root``'s file system."""
    return shutil.disk_usage(root).free


def remove_quietly(path: Path) -> bool:
    """Delete ``path`` if it is there; whether it is gone. Never raises (a read-only folder, a
    file of another user): the caller goes on without it."""
    try:
        path.unlink(missing_ok=True)
    except OSError as exc:
        logger.warning("could not delete %s (%s)", path, exc)
        return False
    return True


class OwnedFolder:
    """``root``, created 0700 if missing, locked for this process until :meth:`release`.

    Raises ``RuntimeError`` naming the folder when another tier holds it.
    """

    def __init__(self, root: Path) -> None:
        self.root = root
        root.mkdir(parents=True, exist_ok=True, mode=0o700)
        mode = stat.S_IMODE(root.stat().st_mode)
        if mode & 0o077:
            logger.warning("the disk tier folder %s is open to other users (mode %o); its chunk "
                           "files are private (0600), but a folder of mode 0700 keeps even "
                           "their names to this user", root, mode)
        fd = os.open(root / LOCK_NAME, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            if exc.errno not in (errno.EWOULDBLOCK, errno.EAGAIN):
                raise
            raise RuntimeError(
                f"the disk tier folder {root} is in use by another disk tier (pid {holder}): "
                f"each server, and each data-parallel rank, needs its own "
                f"--cacheblend-disk-tier-dir") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        # A file object, so that a tier dropped without close() still lets the folder go.
        self._lock_file = os.fdopen(fd, "r+b", buffering=0)

    def temporary(self, key: str) -> Path:
        """A new temporary file name for ``key``'s next write, unique across processes, hosts
        and PID namespaces."""
        return self.root / f".{key}.{uuid.uuid4().hex}.tmp"

    def remove_stale_temporaries(self) -> int:
        """Delete our temporary files (writes a crash cut off: only the lock holder writes
        here); other files are left alone. How many were deleted."""
        removed = 0
        for path in self.root.glob(".*.tmp"):
            if _TEMPORARY.fullmatch(path.name):
                removed += remove_quietly(path)
        return removed

    def chunk_files(self, suffix: str) -> Iterator[tuple[str, int, float]]:
        """``(key, bytes, mtime)`` of every ``<hex key><suffix>`` file, made private (0600) if
        an older version left it readable to others. Files that vanish while listed are
        skipped."""
        for path in self.root.glob(f"*{suffix}"):
            key = path.name.removesuffix(suffix)
            if not _HEX.fullmatch(key):
                continue
            try:
                st = path.stat()
            except OSError:  # deleted since the listing
                continue
            if stat.S_IMODE(st.st_mode) & 0o077:
                try:
                    path.chmod(0o600)
                except OSError as exc:  # another user's file: indexed, then read or dropped
                    logger.warning("could not make %s private (%s)", path, exc)
            yield key, st.st_size, st.st_mtime

    def free_bytes(self) -> int:
        return free_bytes(self.root)

    def release(self) -> None:
        """Give the folder up (another tier may own it next). Idempotent."""
        self._lock_file.close()  # closing the last descriptor drops the flock
