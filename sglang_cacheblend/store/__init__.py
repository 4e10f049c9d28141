"""The KV Cache Store below SGLang's token pool: chunk KV in host RAM, on disk, in Mooncake.

Pure torch (no SGLang): a tier holds :class:`~.entry.ChunkKV` under a :func:`~.entry.chunk_key`
and says what it evicted, so a caller can spill an entry one tier down; :class:`ChunkStore`
chains the tiers. The SGLang side (spill on pool eviction, write-through of computed chunks,
load-back into pool slots inside admission's budget) is ``sglang_cacheblend.srt.radix_cache``
and ``sglang_cacheblend.serving.admission``.
"""

from sglang_cacheblend.store.chunk_store import ChunkStore, StoreHit
from sglang_cacheblend.store.disk_tier import DiskTier
from sglang_cacheblend.store.entry import ChunkKV, chunk_key
from sglang_cacheblend.store.host_tier import HostTier
from sglang_cacheblend.store.mooncake_tier import MooncakeStats, MooncakeTier
from sglang_cacheblend.store.tier import KVTier, TierStats

__all__ = [
    "ChunkKV",
    "ChunkStore",
    "DiskTier",
    "HostTier",
    "KVTier",
    "MooncakeStats",
    "MooncakeTier",
    "StoreHit",
    "TierStats",
    "chunk_key",
]
