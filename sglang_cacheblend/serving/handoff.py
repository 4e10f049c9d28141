"""Chunk KV handed to the chunk index: computed, loaded, context and precomputed chunks.

Every way KV enters the index goes through :meth:`ChunkHandoff.insert`: the index takes the
slots (or reports them redundant when an equal chunk got there first, and they are freed here),
and a new chunk computed on this server is written through to the store's persistent tiers.
A chunk loaded from a tier is not written back (it came from there); the chunk context's KV is
cheap to recompute and is not written at all.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Hashable, Sequence
from typing import TYPE_CHECKING

import torch

from sglang_cacheblend.serving.pool_io import read_chunk_kv

if TYPE_CHECKING:
    from radix_ext import ChunkIndex, InsertChunkResult
    from sglang_cacheblend.serving.blend_request import BlendOutcome
    from sglang_cacheblend.serving.pool import ChunkPool
    from sglang_cacheblend.serving.sources import AdmissionState
    from sglang_cacheblend.store import ChunkStore

__all__ = ["ChunkHandoff", "precompute_free_ranges"]

logger = logging.getLogger(__name__)


class ChunkHandoff:
    """Puts chunk KV that sits in pool slots into the index (and the persistent tiers)."""

    def __init__(self, index: ChunkIndex, pool: ChunkPool, store: ChunkStore | None,
                 store_key: Callable[[Hashable, Sequence[int]], str], *,
                 page_size: int = 1) -> None:
        self._index = index
        self._pool = pool
        self._store = store
        self._store_key = store_key
        self._page_size = page_size

    def insert(self, namespace: Hashable, token_ids: Sequence[int], kv_loc: torch.Tensor,
               positions: int | torch.Tensor, *, rid: Hashable | None = None,
               persist: bool = True) -> InsertChunkResult:
        """Hand a chunk's slots to the index (see :meth:`radix_ext.ChunkIndex.insert`).

        ``kv_loc`` ``(chunk_len,)`` int64 holds the chunk's KV already; ``positions`` is the
        start position or the per-token positions it was computed at. For a chunk already
        cached, ``redundant_loc`` holds the caller's slots, which the caller frees. With
        ``rid`` the entry is locked for that request too. A new chunk is written through to
        the persistent tiers unless ``persist`` is false.
        """
        if self._page_size != 1:
            raise ValueError(
                f"chunk KV needs page_size 1 (slots are freed per chunk), got {self._page_size}")
        result = self._index.insert(namespace, token_ids, kv_loc, positions, rid=rid)
        store = self._store
        if persist and result.inserted and store is not None and store.writes_through:
            try:
                kv = read_chunk_kv(self._pool.kv_cache(), result.kv_loc, result.positions,
                                   list(token_ids))
                store.persist(self._store_key(namespace, token_ids), kv)
            except Exception:  # noqa: BLE001 - the chunk stays in the pool; serving goes on
                logger.exception("chunk KV write-through failed")
        return result

    def adopt(self, rid: Hashable, state: AdmissionState, outcome: BlendOutcome) -> None:
        """Take the KV a blended forward left in pending slots into the index, locked for
        ``rid`` like a hit (the request copied it already; the lock goes at release)."""
        context = outcome.context
        if context is not None:
            self._adopt_one(state, context, state.context_namespace, 0, rid=rid, persist=False)
        for miss in outcome.computed:
            self._adopt_one(state, miss, state.namespace, miss.prefix_len, rid=rid)
            if miss.sink_loc.numel():  # the sink's KV was only there to compute the chunk
                self._pool.free(miss.sink_loc)
        for load in outcome.loaded:
            self._adopt_one(state, load, state.namespace, load.kv.positions.clone(), rid=rid,
                            persist=False)

    def _adopt_one(self, state: AdmissionState, item, namespace: Hashable,
                   positions: int | torch.Tensor, **kwargs) -> None:
        """One pending item's slots to the index; it stays pending (freed at release) if
        the insert raises, so its slots always have exactly one owner."""
        state.take_pending(item)
        try:
            result = self.insert(namespace, item.token_ids.tolist(), item.kv_loc, positions,
                                 **kwargs)
        except Exception:
            state.pending.append(item)
            raise
        if result.redundant_loc is not None:
            self._pool.free(result.redundant_loc)


def precompute_free_ranges(*, start: int, end: int, protected: int, up_to: int,
                           chunk_inserted: bool, keeps_prefix: bool) -> list[tuple[int, int]]:
    """The row ranges a finished precompute frees once its chunk went to the index.

    A standalone precompute matched no prefix, so it owns its whole row; one after a chunk
    context owns it from its matched prefix (``protected``, at most ``start``) on:

    ===============  ============================  ========================================
    row positions    KV of                         after the hand-off
    ===============  ============================  ========================================
    [0, start)       the sink (and the context)    freed; with a shared context
                                                   (``keeps_prefix``): into the prefix tree
                                                   instead (the next precompute's prefix); a
                                                   family member's own context: freed
    [start, end)     the chunk, at those positions owned by the index (a duplicate: freed)
    [end, up_to)     generated tokens, if any      freed
    [up_to, ...)     over-allocation               freed by SGLang's ``release_kv_cache``
    ===============  ============================  ========================================

    The caller then sets ``cache_protected_len = up_to``, so every slot has one owner.
    """
    ranges = [] if keeps_prefix else [(protected, start)]
    ranges.append((end if chunk_inserted else start, up_to))
    return [(lo, hi) for lo, hi in ranges if lo < hi]
