"""Which tiers a server keeps below its pool, as chosen by the ``--cacheblend-*-tier`` flags."""

from __future__ import annotations

import atexit
from dataclasses import dataclass

from sglang_cacheblend.store.chunk_store import ChunkStore, WritePolicy

__all__ = ["StoreConfig", "build_store"]

MB = 1 << 20
_LOOPBACK = ("127.0.0.1", "localhost")


@dataclass(frozen=True)
class StoreConfig:
    """Tier sizes in MiB (0 turns a tier off), the disk tier's folder, the write policy, the
    Mooncake master and metadata server for sharing between servers, and the bound of the
    queue of writes to them in MiB (each queued write is a CPU copy of one chunk's KV)."""

    host_mb: int = 0
    disk_dir: str | None = None
    disk_mb: int = 10240
    policy: WritePolicy = "write-through"
    mooncake_master: str | None = None
    mooncake_metadata: str | None = None
    queue_mb: int = 512

    def __post_init__(self) -> None:
        for name, least in (("host_mb", 0), ("disk_mb", 0), ("queue_mb", 1)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < least:
                raise ValueError(f"{name} must be an int >= {least}, got {value!r}")
        if self.policy not in ("write-through", "spill"):
            raise ValueError(f"policy must be 'write-through' or 'spill', got {self.policy!r}")
        if (self.mooncake_master is None) != (self.mooncake_metadata is None):
            raise ValueError("mooncake_master and mooncake_metadata go together")
        if self.mooncake_master is not None:
            host = self.mooncake_master.rsplit(":", 1)[0]
            if host not in _LOOPBACK or ":" not in self.mooncake_master:
                raise ValueError(f"mooncake_master must be 127.0.0.1:PORT (loopback only), got "
                                 f"{self.mooncake_master!r}")

    @property
    def enabled(self) -> bool:
        return bool(self.host_mb) or self.disk_dir is not None or self.mooncake_master is not None


def build_store(config: StoreConfig) -> ChunkStore | None:
    """The configured tiers, or None when there are none (chunk KV lives in the pool only)."""
    if not config.enabled:
        return None
    from sglang_cacheblend.store.host_tier import HostTier

    host = HostTier(config.host_mb * MB) if config.host_mb else None
    persistent = []
    if config.disk_dir is not None:
        from sglang_cacheblend.store.disk_tier import DiskTier

        persistent.append(("disk", DiskTier(config.disk_dir, config.disk_mb * MB)))
    if config.mooncake_master is not None:
        from sglang_cacheblend.store.mooncake_tier import MooncakeTier

        persistent.append(("mooncake", MooncakeTier(config.mooncake_master,
                                                    config.mooncake_metadata)))
    store = ChunkStore(host=host, persistent=persistent, policy=config.policy,
                       max_queued_bytes=config.queue_mb * MB)
    # The scheduler process exits through sys.exit on shutdown: land what is queued (briefly)
    # and let Mooncake's client leave cleanly.
    atexit.register(store.close, 10.0)
    return store
