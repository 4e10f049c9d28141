"""The ``cacheblend`` radix-cache backend: SGLang's prefix tree plus the chunk index.

Registered by the plugin as ``register_radix_cache_backend("cacheblend", create_cacheblend_cache)``
and selected with ``--radix-cache-backend cacheblend``.

Why the legacy ``RadixCache`` and not ``UnifiedRadixCache``
-----------------------------------------------------------
The legacy tree keeps this glue small: object nodes whose ``value`` is the int64 slot tensor and
whose ``last_access_time`` is ``time.monotonic()``, the same clock as the chunk index, so a single
LRU order spans both stores. FlexKV's backend builds on it too. What is lost: HiCache (host/L3
tiers), session radix caches and streaming sessions, the ``tlru`` eviction policy and mamba/SWA
components; ``create_cacheblend_cache`` refuses those configurations loudly. Exact-prefix
behaviour (``match_prefix``, ``insert``, ``checkpoint``, locks) is inherited unchanged.

One pool, two stores
--------------------
Chunk KV lives in the same token-to-KV pool as the tree's KV. The scheduler sees both through
``evictable_size()`` / ``protected_size()`` / ``total_size()`` (the tree's plus the index's), so
its leak check ``available + evictable + protected (+ uncached) == max_total_num_tokens`` holds
with chunk KV held by the index. Under memory pressure ``evict`` frees from whichever store holds
the least recently used evictable KV: the tree's next victim leaf or the index's LRU entry.

Namespaces: blended KV is never an exact prefix of an unblended request
-----------------------------------------------------------------------
- Chunk entries are keyed by :class:`~radix_ext.ChunkNamespace` (model, ``cache_salt``,
  the caller's ``extra_key``, RoPE config, how the chunk KV was computed); build one with
  :meth:`CacheBlendRadixCache.chunk_namespace`. Chunk KV is exact for the chunk standalone.
- A request that asks for blending carries the ``extra_key`` of its blend settings
  (:mod:`sglang_cacheblend.serving.blend_namespace`, set by the tokenizer hook). Its approximate
  KV goes into the prefix tree under that key like any finished request's, so a follow-up turn
  blended the same way reuses it as a prefix, and no other request ever matches it.

Requests with chunks
--------------------
The per-request side (locking a request's hits, planning its blend, slots for its missed chunks,
handing computed chunks to the index, release) is SGLang-free:
:class:`~sglang_cacheblend.serving.admission.Admission`. This class forwards SGLang's cache
protocol to it (``match_prefix``, ``checkpoint``, ``on_release``, ``release_aborted_request``;
the admission hook calls :meth:`admit_chunks`), with SGLang's objects adapted by
:mod:`.scheduler_view`. A request's chunk layout is the
:class:`~sglang_cacheblend.serving.layout.ChunkLayout` the tokenizer process wrote, decoded once
(:func:`.layout_envelope.layout_of`). The factory is :mod:`.cache_factory`.

Chunk KV is read-only
---------------------
Slots in ``ChunkMatch.kv_loc`` belong to the index. A request that reuses a chunk copies (and
RoPE-realigns) that KV into slots of its own and writes its blended KV there; nothing writes to a
chunk's slots after the hand-off (``handoff.insert``).
"""

from __future__ import annotations

import dataclasses
import heapq
import logging
import time
from collections.abc import Callable, Hashable
from typing import TYPE_CHECKING

import torch
from sglang.srt.mem_cache.base_prefix_cache import (
    EvictParams,
    EvictResult,
    MatchPrefixParams,
    MatchResult,
)
from sglang.srt.mem_cache.radix_cache import RadixCache

from radix_ext import (
    ChunkIndex,
    ChunkNamespace,
    ChunkStats,
    EvictedChunk,
    TokenIds,
)
from sglang_cacheblend.options import ServerOptions
from sglang_cacheblend.serving.admission import Admission
from sglang_cacheblend.serving.controller import LoadingController
from sglang_cacheblend.serving.handoff import ChunkHandoff
from sglang_cacheblend.serving.pool_io import read_chunk_kv
from sglang_cacheblend.serving.weights import WeightsIdentity
from sglang_cacheblend.srt.layout_envelope import layout_of
from sglang_cacheblend.srt.scheduler_view import (
    SGLangChunkPool,
    hand_off_precompute,
    request_view,
)
from sglang_cacheblend.store import ChunkStore, chunk_key

if TYPE_CHECKING:
    from sglang.srt.managers.schedule_batch import Req
    from sglang.srt.mem_cache.base_prefix_cache import CacheRequestHandle
    from sglang.srt.mem_cache.cache_init_params import CacheInitParams

logger = logging.getLogger(__name__)


class CacheBlendRadixCache(RadixCache):
    """SGLang's legacy radix tree that also owns a :class:`~radix_ext.ChunkIndex`.

    Parameters
    ----------
    params : CacheInitParams
        As for ``RadixCache``; the chunk index frees into ``params.token_to_kv_pool_allocator``.
    model_id : str
        The served model's path (or hub id) for chunk namespaces; with ``revision``, and the
        weights' fingerprint when it is a local folder
        (:class:`~sglang_cacheblend.serving.weights.WeightsIdentity`).
    rope : tuple[tuple[str, Hashable], ...]
        Rotary configuration for chunk namespaces, sorted ``(name, value)`` pairs.
    chunk_store : ChunkStore, optional
        Tiers below the pool: evicted chunks spill there, computed chunks are written through,
        and admission loads pool misses back from them.
    controller : LoadingController, optional
        Measures load and compute speeds; picks the recompute ratio of the requests whose
        ``ratio_policy`` is "controller" (the server's ``--cacheblend-ratio-policy`` or their own).
    """

    def __init__(
        self,
        params: CacheInitParams,
        *,
        model_id: str = "model",
        revision: str | None = None,
        rope: tuple[tuple[str, Hashable], ...] = (),
        chunk_store: ChunkStore | None = None,
        controller: LoadingController | None = None,
    ) -> None:
        # RadixCache.__init__ calls reset(), which resets the index: create the index first.
        self.chunk_store = chunk_store
        self.spill_failures = 0
        self.chunk_index = ChunkIndex(
            params.token_to_kv_pool_allocator, clock=time.monotonic,
            on_evict=self._spill if chunk_store is not None and chunk_store.takes_spills
            else None)
        self._weights = WeightsIdentity(model_id, revision)
        self._rope = rope
        pool = SGLangChunkPool(self)
        self.handoff = ChunkHandoff(self.chunk_index, pool, chunk_store, self.store_key,
                                    page_size=params.page_size)
        self.admission = Admission(index=self.chunk_index, pool=pool,
                                   namespace_of=self.chunk_namespace, store_key=self.store_key,
                                   store=chunk_store,
                                   controller=controller or loading_controller_for(ServerOptions()),
                                   handoff=self.handoff)
        super().__init__(params)

    # ------------------------------------------------------------------ chunk storage

    def chunk_namespace(
        self, *, cache_salt: str | None = None, extra_key: str | None = None, variant: str = ""
    ) -> ChunkNamespace:
        """The chunk namespace of this model for a request's ``cache_salt``/``extra_key``."""
        return ChunkNamespace(self._weights.current, cache_salt, extra_key, self._rope, variant)

    def weights_changed(self, model_path: str | None = None) -> None:
        """SGLang replaced the served weights (``update_weights_*``): chunk KV computed with
        the old ones is never looked up again, in the pool or in any tier (it ages out)."""
        identity = self._weights.changed(model_path)
        logger.info("weights changed: chunk namespaces now name %s", identity)

    @staticmethod
    def store_key(namespace: Hashable, token_ids: TokenIds) -> str:
        """The chunk's key in the store's tiers (stable across processes and servers)."""
        return chunk_key(namespace, token_ids)

    def insert_prefix(self, req: Req, length: int) -> None:
        """Put the first ``length`` slots of ``req``'s row into the prefix tree (exact KV of
        those tokens), freeing what the tree held already beyond the request's own prefix: a
        precompute's sink and chunk context, so the next precompute reuses them. The key is
        built from the same ids as SGLang's own ``checkpoint`` (the tree compares id types)."""
        self._insert_cache(req, req.full_untruncated_fill_ids[:length])

    def _spill(self, evicted: EvictedChunk) -> None:
        """The index evicts a chunk: copy its KV to the store before its slots are freed."""
        try:
            token_ids = evicted.token_ids
            kv = read_chunk_kv(self.token_to_kv_pool_allocator.get_kvcache(), evicted.kv_loc,
                               evicted.positions, token_ids)
            self.chunk_store.spill(self.store_key(evicted.namespace, token_ids), kv)
        except Exception:
            self.spill_failures += 1
            logger.exception("spilling an evicted chunk to the store failed")

    def chunk_stats(self) -> ChunkStats:
        """Hits, misses, inserts, evictions and sizes of the chunk index (tokens)."""
        return self.chunk_index.stats()

    def store_report(self) -> dict[str, object]:
        """The store's tiers and writer, and the Loading Controller's speeds (``/server_info``)."""
        report: dict[str, object] = {"controller": self.admission.controller.snapshot()}
        if self.chunk_store is not None:
            report.update(self.chunk_store.stats(), spill_failures=self.spill_failures)
        return report

    def admit_chunks(self, req: Req, *, remaining_tokens: Callable[[], int]) -> None:
        """Called when SGLang admits ``req`` to prefill: its chunks' admission (see
        :meth:`sglang_cacheblend.serving.admission.Admission.admit`). Never raises."""
        try:
            layout = layout_of(req)
            if layout is None or layout.precompute or self.disable:
                return
            view = request_view(req)
        except Exception:
            logger.exception("request %s: reading it for chunk admission failed", req.rid)
            return
        self.admission.admit(view, layout, remaining_tokens=remaining_tokens)

    # ------------------------------------------------------------------ SGLang overrides

    def reset(self) -> None:
        """Drop the tree and the index; slots are left to ``allocator.clear()`` as for the tree."""
        super().reset()
        self.chunk_index.reset()
        self.admission.reset()  # their slots go back with allocator.clear(), as the tree's

    def match_prefix(self, params: MatchPrefixParams) -> MatchResult:
        """SGLang's exact-prefix match, plus a lookup of the request's chunk spans.

        Side effects: access times only (the scheduler calls this several times per request).
        A standalone precompute request matches nothing, so its whole row is its own; one after
        a chunk context matches at most the sink and the context.
        """
        layout = None if params.req is None else layout_of(params.req)
        if layout is not None and layout.precompute:
            if not layout.context:
                return self._empty_match_result
            # After a chunk context: the tree may hold the sink and the context (exact KV,
            # put there by an earlier precompute), never more than that.
            start = min(layout.spans[0][0], len(params.key))
            return super().match_prefix(dataclasses.replace(params, key=params.key[:start]))
        result = super().match_prefix(params)
        if layout is not None and not self.disable:
            self._touch(params.req, layout, result.device_prefix_len)
        return result

    def _touch(self, req: Req, layout, prefix_len: int) -> None:
        try:
            view = request_view(req, prefix_len=prefix_len)
        except Exception:
            logger.exception("request %s: reading it for a chunk lookup failed", req.rid)
            return
        self.admission.touch(view, layout)

    def checkpoint(self, req: Req, *, up_to: int) -> None:
        """As ``RadixCache.checkpoint``, except for precompute requests.

        Their KV never enters the prefix tree: when the request finishes (not aborted), its chunk
        slots go to the chunk index; before that, the row stays the request's.
        """
        layout = layout_of(req)
        if layout is None or not layout.precompute:
            super().checkpoint(req, up_to=up_to)
            return
        from sglang.srt.managers.schedule_batch import FINISH_ABORT

        aborted = isinstance(req.finished_reason, FINISH_ABORT)
        if not self.disable and req.finished() and not aborted:
            try:
                hand_off_precompute(self, req, layout, up_to)
            except Exception:
                logger.exception("request %s: storing its precomputed chunk failed", req.rid)

    def evict(self, params: EvictParams) -> EvictResult:
        """Free at least ``params.num_tokens`` from the tree and the chunk index together.

        The tree picks its next victim leaf by its eviction policy; between that leaf and the
        index's least recently used entry, the one accessed longer ago goes first (ties go to the
        tree). Locked tree nodes and locked chunks are never evicted.
        """
        start_time = time.perf_counter()
        need = params.num_tokens
        heap = []
        if not self.disable:
            heap = [(self.eviction_strategy.get_priority(n), n) for n in self.evictable_leaves]
            heapq.heapify(heap)
        tree_freed = chunk_freed = 0
        while tree_freed + chunk_freed < need:
            leaf = heap[0][1] if heap else None
            head = self.chunk_index.lru_head()
            if head is not None and (leaf is None or head.last_access_time < leaf.last_access_time):
                older_than = None if leaf is None else leaf.last_access_time
                result = self.chunk_index.evict(need - tree_freed - chunk_freed,
                                                older_than=older_than)
                chunk_freed += result.num_tokens_evicted
                continue
            if leaf is None:
                break
            heapq.heappop(heap)
            tree_freed += self._evict_leaf(leaf, heap)
        self.update_eviction_metrics(tree_freed + chunk_freed, start_time)
        return EvictResult(num_tokens_evicted=tree_freed + chunk_freed)

    def evictable_size(self) -> int:
        return super().evictable_size() + self.chunk_index.evictable_size()

    def protected_size(self) -> int:
        return super().protected_size() + self.chunk_index.locked_size()

    def total_size(self) -> int:
        return super().total_size() + self.chunk_index.total_size()

    def all_values_flatten(self) -> torch.Tensor:
        tree_values = [child.value for child in self._iter_nodes()]
        return torch.cat([*tree_values, self.chunk_index.all_kv_loc().to(self.device)])

    def on_release(self, req: Req, *, checkpointed: bool) -> None:
        super().on_release(req, checkpointed=checkpointed)
        self.admission.release(req.rid)

    def release_aborted_request(self, handle: CacheRequestHandle) -> None:
        super().release_aborted_request(handle)
        self.admission.release(handle.rid)

    def check_integrity(self) -> None:
        """Check the chunk index and the tree's size accounting; raise ``AssertionError``."""
        self.chunk_index.check_integrity()
        evictable = protected = 0
        for node in self._iter_nodes():
            assert node.value is not None and len(node.value) == len(node.key)
            if node.lock_ref > 0:
                protected += len(node.key)
            else:
                evictable += len(node.key)
        assert (evictable, protected) == (self.evictable_size_, self.protected_size_), (
            f"tree sizes {(self.evictable_size_, self.protected_size_)} != {(evictable, protected)}"
        )
        owned = self.all_values_flatten()
        assert owned.unique().numel() == owned.numel(), "a slot is owned twice"

    # ------------------------------------------------------------------ helpers

    def _evict_leaf(self, leaf, heap: list) -> int:
        """Free one tree leaf, as ``RadixCache.evict`` does, and queue its parent if it became a
        leaf; return the tokens freed."""
        self.token_to_kv_pool_allocator.free_segment(leaf.value, start_pos=0)
        freed = len(leaf.value)
        self._delete_leaf(leaf)
        parent = leaf.parent
        if not parent.children and parent.lock_ref == 0:
            heapq.heappush(heap, (self.eviction_strategy.get_priority(parent), parent))
        self.kv_events.record_remove(leaf)
        return freed

    def _iter_nodes(self):
        stack = list(self.root_node.children.values())
        while stack:
            node = stack.pop()
            yield node
            stack.extend(node.children.values())


def loading_controller_for(options: ServerOptions) -> LoadingController:
    """The Loading Controller of a server's options (its ratio floor and ceiling)."""
    return LoadingController(floor=options.controller_min_ratio,
                             ceiling=options.controller_max_ratio)
