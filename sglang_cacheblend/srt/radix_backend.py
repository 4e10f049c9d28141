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
  (:mod:`sglang_cacheblend.srt.blend_keys`, set by the tokenizer hook). Its approximate KV goes
  into the prefix tree under that key like any finished request's, so a follow-up turn blended
  the same way reuses it as a prefix, and no other request ever matches it.

Requests with chunks
--------------------
A request's CacheBlend action (``Req.kv_hints``, written by the tokenizer hook, see
``request_chunks``) is read in ``match_prefix``, which looks its chunk spans up (touching only
access times, as it runs several times per request). ``admit_chunks`` (called when the request
is admitted to prefill) locks the hits until ``on_release`` / ``release_aborted_request``,
counts hits and misses once per request and decides the blend (:meth:`_plan_blend`): chunks that
missed get fresh slots, the model computes them standalone in the same forward and hands them
to the index (:meth:`store_computed_chunk`), so the next request hits them. Spans that end
inside the exact prefix hit are served by the prefix and not looked up. A precompute request
matches no prefix, so it owns its whole row, and ``checkpoint`` hands its chunk's slots to the
index when it finishes.

Chunk KV is read-only
---------------------
Slots in ``ChunkMatch.kv_loc`` belong to the index. A request that reuses a chunk copies (and
RoPE-realigns) that KV into slots of its own and writes its blended KV there; nothing writes to a
chunk's slots after ``insert_chunk``.
"""

from __future__ import annotations

import heapq
import json
import logging
import time
from collections.abc import Hashable, Iterable, Sequence
from typing import TYPE_CHECKING

import torch
from sglang.srt.mem_cache.base_prefix_cache import (
    EvictParams,
    EvictResult,
    MatchPrefixParams,
    MatchResult,
)
from sglang.srt.mem_cache.radix_cache import RadixCache

from radix_ext import ChunkIndex, ChunkMatch, ChunkNamespace, ChunkStats, InsertChunkResult
from radix_ext.base import LockResult, TokenIds
from sglang_cacheblend.chunks import ChunkAction, variant_sink
from sglang_cacheblend.srt.blend_keys import chunk_extra_key, effective_config
from sglang_cacheblend.srt.blend_requests import BlendRequest, ChunkHit, ChunkMiss
from sglang_cacheblend.srt.options import ServerOptions
from sglang_cacheblend.srt.request_chunks import chunk_action_of

if TYPE_CHECKING:
    from sglang.srt.managers.schedule_batch import Req
    from sglang.srt.mem_cache.base_prefix_cache import CacheRequestHandle
    from sglang.srt.mem_cache.cache_init_params import CacheInitParams
    from sglang.srt.mem_cache.registry import TreeCacheBuildContext

logger = logging.getLogger(__name__)

class CacheBlendRadixCache(RadixCache):
    """SGLang's legacy radix tree that also owns a :class:`~radix_ext.ChunkIndex`.

    Parameters
    ----------
    params : CacheInitParams
        As for ``RadixCache``; the chunk index frees into ``params.token_to_kv_pool_allocator``.
    model_id : str
        Model identity for chunk namespaces (path plus revision).
    rope : tuple[tuple[str, Hashable], ...]
        Rotary configuration for chunk namespaces, sorted ``(name, value)`` pairs.
    """

    def __init__(
        self,
        params: CacheInitParams,
        *,
        model_id: str = "model",
        rope: tuple[tuple[str, Hashable], ...] = (),
    ) -> None:
        # RadixCache.__init__ calls reset(), which resets the index: create the index first.
        self._chunks = ChunkIndex(params.token_to_kv_pool_allocator, clock=time.monotonic)
        self._admitted: dict[Hashable, tuple[ChunkMatch, ...]] = {}
        self._blends: dict[Hashable, BlendRequest] = {}
        self._reports: dict[Hashable, dict[str, object]] = {}
        # Slots of missed chunks handed to a request's forward and not yet in the index.
        self._pending: dict[Hashable, dict[int, tuple[ChunkMiss, Hashable]]] = {}
        self._options = ServerOptions.from_env()
        self._model_id = model_id
        self._rope = rope
        super().__init__(params)

    # ------------------------------------------------------------------ chunk API

    def chunk_namespace(
        self, *, cache_salt: str | None = None, extra_key: str | None = None, variant: str = ""
    ) -> ChunkNamespace:
        """The chunk namespace of this model for a request's ``cache_salt``/``extra_key``."""
        return ChunkNamespace(self._model_id, cache_salt, extra_key, self._rope, variant)

    def match_chunks(
        self, namespace: Hashable, prompt_ids: TokenIds, spans: Iterable[tuple[int, int]]
    ) -> list[ChunkMatch]:
        """Look up each ``[start, end)`` span of ``prompt_ids``; only access times change."""
        return self._chunks.match(namespace, prompt_ids, spans)

    def lock_chunks(self, rid: Hashable, matches: Sequence[ChunkMatch]) -> LockResult:
        """Protect the hits of ``matches`` until ``release_chunks(rid)``; idempotent per chunk.

        Entries evicted since the lookup come back in ``LockResult.stale``: treat them as misses.
        """
        return self._chunks.lock(rid, matches)

    def release_chunks(self, rid: Hashable) -> int:
        """Unlock every chunk ``rid`` holds; idempotent. Returns the tokens it held."""
        return self._chunks.unlock(rid)

    def insert_chunk(
        self,
        namespace: Hashable,
        token_ids: TokenIds,
        kv_loc: torch.Tensor,
        positions: int | torch.Tensor,
        *,
        rid: Hashable | None = None,
    ) -> InsertChunkResult:
        """Hand a standalone chunk's slots to the index (see :meth:`radix_ext.ChunkIndex.insert`).

        ``kv_loc``: shape ``(chunk_len,)``, int64, on the pool allocator's device; ``positions``:
        the start position or per-token absolute positions the KV was computed at. For a chunk
        already cached, ``redundant_loc`` holds the caller's slots, which the caller frees. With
        ``rid`` the entry is locked for that request too.
        """
        if self.page_size != 1:
            raise ValueError(
                f"chunk KV needs page_size 1 (slots are freed per chunk), got {self.page_size}"
            )
        return self._chunks.insert(namespace, token_ids, kv_loc, positions, rid=rid)

    def chunk_stats(self) -> ChunkStats:
        """Hits, misses, inserts, evictions and sizes of the chunk index (tokens)."""
        return self._chunks.stats()

    # ------------------------------------------------------------------ requests with chunks

    def admit_chunks(self, req: Req, *, spare_tokens: int | None = None) -> None:
        """Lock the chunk hits of a request just admitted to prefill and decide its blend.

        Counts each of its looked-up spans once as a hit or a miss. When the request blends,
        its missed chunks get fresh slots here; the model fills them (standalone chunk KV) in
        the request's forward and hands them back through :meth:`store_computed_chunk`.
        ``spare_tokens`` is what the scheduler's admission budget has left after this request
        (free plus evictable, less what admitted requests will take); missed chunks are
        computed standalone only within it. Never raises: an error leaves the request to a
        normal prefill (the scheduler must keep serving).
        """
        action = chunk_action_of(req)
        if action is None or action.precompute or self.disable:
            return
        try:
            self._admit(req, action, spare_tokens)
        except Exception:
            logger.exception("request %s: chunk admission failed; prefilling it normally", req.rid)
            self._forget_request(req.rid)

    def _admit(self, req: Req, action: ChunkAction, spare_tokens: int | None) -> None:
        matches = self._match_request_chunks(req, action, req.prefix_len)
        self._chunks.lock(req.rid, matches)
        self._admitted[req.rid] = tuple(matches)
        report: dict[str, object] = {
            "prefix_cached_tokens": int(req.prefix_len),
            "chunks": len(action.spans),
            "chunk_hits": sum(m.hit for m in matches),
            "chunk_misses": sum(not m.hit for m in matches),
        }
        self._reports[req.rid] = report
        blend, reason = self._plan_blend(req, action, matches, spare_tokens)
        report["blended"] = blend is not None
        if blend is None:
            report["reason"] = reason
            return
        self._blends[req.rid] = blend
        report["chunk_reused_tokens"] = blend.reused_tokens
        report["computed_standalone_tokens"] = sum(m.end - m.start for m in blend.misses)

    def _plan_blend(
        self, req: Req, action: ChunkAction, matches: Sequence[ChunkMatch],
        spare_tokens: int | None,
    ) -> tuple[BlendRequest | None, str]:
        """Blend when enabled and enough of the prompt comes from chunks; else say why not.

        Chunk tokens count whether they hit or not: a missed chunk is computed standalone first
        (and cached for the next request), which is what makes it reusable at all.
        """
        if not self._options.enabled:
            return None, "cacheblend is not enabled on this server"
        config = effective_config(self._options.blend, action)
        chunk_tokens = sum(m.span_len for m in matches)
        if not matches:
            return None, "no chunk outside the cached prefix"
        if chunk_tokens < config.min_reused_tokens:
            return None, (f"{chunk_tokens} chunk tokens outside the cached prefix, below "
                          f"min_reused_tokens={config.min_reused_tokens}")
        hits = [
            ChunkHit(m.span_start, m.span_start + m.span_len, m.kv_loc, m.positions)
            for m in matches if m.hit
        ]
        misses = self._allocate_misses(
            req, action, [m for m in matches if not m.hit], spare_tokens
        )
        if not hits and not misses:
            return None, "no free KV slots to compute the missed chunks standalone"
        blend = BlendRequest(
            tuple(hits), config, misses=misses, prompt_len=len(req.origin_input_ids)
        )
        return blend, ""

    def _allocate_misses(
        self, req: Req, action: ChunkAction, misses: Sequence[ChunkMatch],
        spare_tokens: int | None,
    ) -> tuple[ChunkMiss, ...]:
        """Slots (sink + chunk) for each missed chunk, as far as the admission budget allows.

        The budget reads the allocator live, so requests admitted after this one see these
        slots as taken. A chunk that does not fit is recomputed in place as an ordinary
        uncached span (the blend stays correct, the chunk is just not cached).
        """
        if not misses or self.page_size != 1:
            return ()
        sink = variant_sink(action.variant)
        allocator = self.token_to_kv_pool_allocator
        namespace = self._request_chunk_namespace(req, action)
        spare = allocator.available_size() if spare_tokens is None else spare_tokens
        out = []
        for match in misses:
            need = len(sink) + match.span_len
            if need > spare:
                break
            if allocator.available_size() < need:
                self.evict(EvictParams(num_tokens=need - allocator.available_size()))
            slots = allocator.alloc(need)
            if slots is None:
                break
            spare -= need
            start, end = match.span_start, match.span_start + match.span_len
            miss = ChunkMiss(
                start, end, torch.tensor(req.origin_input_ids[start:end], dtype=torch.int64),
                sink, slots[: len(sink)], slots[len(sink):],
            )
            self._pending.setdefault(req.rid, {})[id(miss)] = (miss, namespace)
            out.append(miss)
        return tuple(out)

    def store_computed_chunk(self, rid: Hashable, miss: ChunkMiss) -> None:
        """Take a missed chunk's standalone KV (computed by the model) into the index.

        The entry is locked for ``rid`` like a hit; the sink slots are freed, and so are the
        chunk slots if an equal chunk got into the index first.
        """
        pending = self._pending.get(rid, {}).pop(id(miss), None)
        if pending is None:
            raise KeyError(f"request {rid}: chunk [{miss.start}, {miss.end}) is not pending")
        _, namespace = pending
        allocator = self.token_to_kv_pool_allocator
        allocator.free_segment(miss.sink_loc, start_pos=0)
        result = self.insert_chunk(
            namespace, miss.token_ids.tolist(), miss.kv_loc, len(miss.sink_ids), rid=rid
        )
        if result.redundant_loc is not None:
            allocator.free_segment(result.redundant_loc, start_pos=0)

    def _free_pending(self, rid: Hashable) -> None:
        """Free the slots of missed chunks that never reached the index (aborted requests)."""
        for miss, _ in self._pending.pop(rid, {}).values():
            allocator = self.token_to_kv_pool_allocator
            allocator.free_segment(miss.sink_loc, start_pos=0)
            allocator.free_segment(miss.kv_loc, start_pos=0)

    def blend_report(self, rid: Hashable) -> dict[str, object] | None:
        """What the cache decided for a chunked request (``meta_info["cacheblend"]``)."""
        return self._reports.get(rid)

    def blend_request(self, rid: Hashable) -> BlendRequest | None:
        """``BlendRequestSource`` for the model: the blend decided at admission, if any."""
        return self._blends.get(rid)

    def admitted_chunks(self, rid: Hashable) -> tuple[ChunkMatch, ...]:
        """The chunk lookups of an admitted request (hits are locked), in span order."""
        return self._admitted.get(rid, ())

    def _match_request_chunks(
        self, req: Req, action: ChunkAction, prefix_len: int
    ) -> list[ChunkMatch]:
        spans = [(start, end) for start, end in action.spans if end > prefix_len]
        if not spans:
            return []
        namespace = self._request_chunk_namespace(req, action)
        return self.match_chunks(namespace, req.origin_input_ids, spans)

    def _request_chunk_namespace(self, req: Req, action: ChunkAction) -> ChunkNamespace:
        """A request's chunk namespace: its caller's ``extra_key``, not its blend key."""
        return self.chunk_namespace(
            cache_salt=req.cache_salt, extra_key=chunk_extra_key(req.extra_key),
            variant=action.variant,
        )

    def _hand_chunk_to_index(self, req: Req, action: ChunkAction, up_to: int) -> None:
        """Move a finished precompute request's chunk slots from its row to the chunk index.

        The request matched no prefix, so it owns its whole row:

        ===============  ============================  ========================================
        row positions    KV of                         after this call
        ===============  ============================  ========================================
        [0, start)       the attention sink            freed here
        [start, end)     the chunk, at those positions owned by the index (a duplicate: freed)
        [end, up_to)     generated tokens, if any      freed here
        [up_to, ...)     over-allocation               freed by ``release_kv_cache``
        ===============  ============================  ========================================

        ``cache_protected_len`` becomes ``up_to``, so ``release_kv_cache`` frees none of
        ``[0, up_to)`` again: every slot has exactly one owner.
        """
        ((start, end),) = action.spans
        protected = req.kv.cache_protected_len
        if self.page_size != 1 or protected > start or end > up_to:
            logger.error(
                "request %s: chunk [%d, %d) not stored (page_size %d, protected %d, kv %d)",
                req.rid, start, end, self.page_size, protected, up_to,
            )
            return
        row = self.req_to_token_pool.req_to_token[req.kv.req_pool_idx, :up_to].to(torch.int64)
        namespace = self._request_chunk_namespace(req, action)
        result = self.insert_chunk(
            namespace, req.origin_input_ids[start:end], row[start:end].clone(), start
        )
        if result.redundant_loc is None:
            ranges = [(protected, start), (end, up_to)]
        else:
            ranges = [(protected, up_to)]
        self.free_kv_row(req.kv, [(lo, hi) for lo, hi in ranges if lo < hi])
        req.kv.cache_protected_len = up_to

    # ------------------------------------------------------------------ SGLang overrides

    def reset(self) -> None:
        """Drop the tree and the index; slots are left to ``allocator.clear()`` as for the tree."""
        super().reset()
        self._chunks.reset()
        self._admitted.clear()
        self._blends.clear()
        self._reports.clear()
        self._pending.clear()  # their slots go back with allocator.clear(), as the tree's

    def match_prefix(self, params: MatchPrefixParams) -> MatchResult:
        """SGLang's exact-prefix match, plus a lookup of the request's chunk spans.

        Side effects: access times only (the scheduler calls this several times per request).
        A precompute request matches nothing, so its whole row is its own.
        """
        action = None if params.req is None else chunk_action_of(params.req)
        if action is not None and action.precompute:
            return self._empty_match_result
        result = super().match_prefix(params)
        if action is not None and not self.disable:
            self._match_request_chunks(params.req, action, result.device_prefix_len)
        return result

    def checkpoint(self, req: Req, *, up_to: int) -> None:
        """As ``RadixCache.checkpoint``, except for precompute requests.

        Their KV never enters the prefix tree: when the request finishes (not aborted), its chunk
        slots go to the chunk index; before that, the row stays the request's.
        """
        action = chunk_action_of(req)
        if action is None or not action.precompute:
            super().checkpoint(req, up_to=up_to)
            return
        from sglang.srt.managers.schedule_batch import FINISH_ABORT

        aborted = isinstance(req.finished_reason, FINISH_ABORT)
        if not self.disable and req.finished() and not aborted:
            self._hand_chunk_to_index(req, action, up_to)

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
            head = self._chunks.lru_head()
            if head is not None and (leaf is None or head.last_access_time < leaf.last_access_time):
                older_than = None if leaf is None else leaf.last_access_time
                result = self._chunks.evict(need - tree_freed - chunk_freed, older_than=older_than)
                chunk_freed += result.num_tokens_evicted
                continue
            if leaf is None:
                break
            heapq.heappop(heap)
            tree_freed += self._evict_leaf(leaf, heap)
        self.update_eviction_metrics(tree_freed + chunk_freed, start_time)
        return EvictResult(num_tokens_evicted=tree_freed + chunk_freed)

    def evictable_size(self) -> int:
        return super().evictable_size() + self._chunks.evictable_size()

    def protected_size(self) -> int:
        return super().protected_size() + self._chunks.locked_size()

    def total_size(self) -> int:
        return super().total_size() + self._chunks.total_size()

    def all_values_flatten(self) -> torch.Tensor:
        tree_values = [child.value for child in self._iter_nodes()]
        return torch.cat([*tree_values, self._chunks.all_kv_loc().to(self.device)])

    def on_release(self, req: Req, *, checkpointed: bool) -> None:
        super().on_release(req, checkpointed=checkpointed)
        self._forget_request(req.rid)

    def release_aborted_request(self, handle: CacheRequestHandle) -> None:
        super().release_aborted_request(handle)
        self._forget_request(handle.rid)

    def _forget_request(self, rid: Hashable) -> None:
        self._free_pending(rid)
        self._chunks.unlock(rid)
        self._admitted.pop(rid, None)
        self._blends.pop(rid, None)
        self._reports.pop(rid, None)

    def check_integrity(self) -> None:
        """Check the chunk index and the tree's size accounting; raise ``AssertionError``."""
        self._chunks.check_integrity()
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


def create_cacheblend_cache(ctx: TreeCacheBuildContext) -> CacheBlendRadixCache:
    """Factory for ``register_radix_cache_backend("cacheblend", ...)``.

    Raises ``ValueError`` for configurations the legacy tree cannot serve (hybrid SWA or mamba
    models, HiCache).
    """
    if ctx.is_hybrid_swa or ctx.is_hybrid_ssm:
        raise ValueError("--radix-cache-backend cacheblend supports full-attention models only")
    if ctx.enable_hierarchical_cache:
        raise ValueError("--radix-cache-backend cacheblend does not support HiCache")
    cache = CacheBlendRadixCache(
        ctx.params, model_id=_model_id(ctx.model_config), rope=_rope_signature(ctx.model_config)
    )
    model = ctx.tp_worker.model_runner.model if ctx.tp_worker is not None else None
    attach = getattr(model, "attach_blend_source", None)
    if callable(attach):
        attach(cache)
    elif ServerOptions.from_env().enabled:
        logger.warning("%s has no blended extend: chunk hits are looked up and locked, but "
                       "requests are prefilled in full", type(model).__name__)
    return cache


def _model_id(model_config) -> str:
    path = getattr(model_config, "model_path", None) or "model"
    revision = getattr(model_config, "revision", None)
    return path if revision is None else f"{path}@{revision}"


def _rope_signature(model_config) -> tuple[tuple[str, Hashable], ...]:
    """The rotary settings that decide the post-RoPE keys, as sorted hashable pairs."""
    hf_config = getattr(model_config, "hf_text_config", None)
    rope = {
        "rope_theta": getattr(hf_config, "rope_theta", None),
        "rope_scaling": getattr(hf_config, "rope_scaling", None),
        "rope_parameters": getattr(hf_config, "rope_parameters", None),
        "partial_rotary_factor": getattr(hf_config, "partial_rotary_factor", None),
        "head_dim": getattr(model_config, "head_dim", None),
    }
    return tuple(
        (name, json.dumps(value, sort_keys=True, default=str))
        for name, value in sorted(rope.items())
    )
