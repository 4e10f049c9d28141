"""Non-prefix chunk index for CacheBlend: standalone chunk KV found at any prompt position.

Pure Python/torch; never imports SGLang. The SGLang glue is
``sglang_cacheblend.srt.radix_cache``.
"""

from __future__ import annotations

from radix_ext.chunk_index import ChunkIndex
from radix_ext.chunk_types import (
    ChunkEvictResult,
    ChunkMatch,
    ChunkNamespace,
    ChunkStats,
    EvictedChunk,
    InsertChunkResult,
    LockResult,
    LruHead,
    SlotFreer,
    TokenIds,
)

__all__ = [
    "ChunkEvictResult",
    "ChunkIndex",
    "ChunkMatch",
    "ChunkNamespace",
    "ChunkStats",
    "EvictedChunk",
    "InsertChunkResult",
    "LockResult",
    "LruHead",
    "SlotFreer",
    "TokenIds",
]
