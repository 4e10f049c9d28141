"""Non-prefix chunk index for CacheBlend: standalone chunk KV found at any prompt position.

Pure Python/torch; never imports SGLang. The SGLang glue is
``sglang_cacheblend.srt.radix_backend``.
"""

from __future__ import annotations

from radix_ext.base import (
    ChunkMatch,
    ChunkNamespace,
    ChunkStats,
    InsertChunkResult,
    LockResult,
    SlotFreer,
)
from radix_ext.chunk_index import ChunkIndex

__all__ = [
    "ChunkIndex",
    "ChunkMatch",
    "ChunkNamespace",
    "ChunkStats",
    "InsertChunkResult",
    "LockResult",
    "SlotFreer",
]
