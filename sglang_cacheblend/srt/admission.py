"""Per-request chunk admission: lock a request's chunk hits, plan its blend, hand chunks over.

One :class:`RequestChunks` per chunked request holds everything the scheduler side decides about
it, from admission to release; :class:`ChunkAdmission` owns those objects for one radix cache
and is what the model reads (``BlendRequestSource``). The life of a chunked request:

1. ``touch`` (each ``match_prefix``): look its spans up, so their access times move on; no lock.
2. ``admit`` (when SGLang admits it to prefill): lock the hits, read the chunks the pool missed
   from the store's tiers (host RAM, disk, Mooncake) when they hold them, allocate slots for
   those loads and for the chunks still missing (the model computes those standalone in the
   request's forward), and, under ``--cacheblend-ratio-policy controller``, let the Loading
   Controller pick the ratio. Never over-commits the pool: SGLang's admission counted the hits
   as evictable, so the locks, the load slots and the miss slots must fit in what its budget has
   left, or the request falls back to a normal prefill with its locks released.
3. ``store_computed_chunk`` / ``store_loaded_chunk`` (from the forward): a missed chunk's KV, or
   a loaded chunk's, now in its slots, goes into the index (locked for the request);
   ``record_load``: the forward's measured load and compute speeds, for the controller.
4. ``finish_forward`` (right after the blended forward): the chunk KV now sits in the request's
   own slots, so the locks are released (the KV may be evicted during a long decode) and no
   later forward of the request (decode, speculative verify) blends again.
5. ``hand_off_precompute`` (a finished precompute request): its chunk's slots go to the index.
6. ``release`` (finish, abort, retraction): locks released, slots never computed freed.

Chunk KV is read-only: hits' slots belong to the index; a request copies (and realigns) them into
slots of its own.
"""

from __future__ import annotations

import dataclasses
import logging
from collections import Counter
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

import torch
from sglang.srt.mem_cache.base_prefix_cache import EvictParams

from sglang_cacheblend.chunks import prefix_variant
from sglang_cacheblend.srt.blend_namespace import chunk_extra_key
from sglang_cacheblend.srt.blend_request import (
    BlendRequest,
    ChunkHit,
    ChunkLoad,
    ChunkMiss,
    ContextPrefix,
)
from sglang_cacheblend.srt.loading_controller import POOL
from sglang_cacheblend.srt.pool_chunk_io import check_fits_pool

if TYPE_CHECKING:
    from sglang.srt.managers.schedule_batch import Req

    from radix_ext import ChunkIndex, ChunkMatch, ChunkNamespace, LockResult
    from sglang_cacheblend.srt.chunk_request import ChunkRequest
    from sglang_cacheblend.srt.loading_controller import LoadingController
    from sglang_cacheblend.store import ChunkStore

__all__ = ["ChunkAdmission", "ChunkCache", "RequestChunks"]

logger = logging.getLogger(__name__)


class ChunkCache(Protocol):
    """What admission needs of its radix cache (``CacheBlendRadixCache``)."""

    chunk_index: ChunkIndex
    page_size: int
    token_to_kv_pool_allocator: Any
    req_to_token_pool: Any
    evict: Callable[..., Any]
    insert_chunk: Callable[..., Any]
    chunk_namespace: Callable[..., ChunkNamespace]
    free_kv_row: Callable[..., Any]
    insert_prefix: Callable[..., Any]
    chunk_store: ChunkStore | None
    loading_controller: LoadingController
    store_key: Callable[..., str]


@dataclass
class RequestChunks:
    """What the scheduler side decided for one admitted chunked request.

    ``report`` is its accounting (``meta_info["cacheblend"]``); ``blend`` the blend the model
    runs, if any; ``pending`` the missed or loaded chunks whose slots were allocated and that
    have not reached the index yet (freed on release if they never do).
    """

    request: ChunkRequest
    namespace: ChunkNamespace
    report: dict[str, object]
    blend: BlendRequest | None = None
    pending: dict[int, ChunkMiss | ChunkLoad | ContextPrefix] = field(default_factory=dict)
    context_namespace: ChunkNamespace | None = None  # the chunk context's own KV, if any


class ChunkAdmission:
    """Admission, blend planning and release of chunked requests on one radix cache."""

    def __init__(self, cache: ChunkCache) -> None:
        self._cache = cache
        self._requests: dict[Hashable, RequestChunks] = {}

    # ------------------------------------------------------------------ scheduler side

    def touch(self, req: Req, request: ChunkRequest, prefix_len: int) -> None:
        """Look the request's spans past the exact prefix up; only access times change."""
        self._match(req, request, prefix_len)

    def admit(self, req: Req, request: ChunkRequest, *,
              remaining_tokens: Callable[[], int]) -> None:
        """Lock the chunk hits of a request just admitted to prefill and decide its blend.

        ``remaining_tokens()`` is SGLang's live admission budget (free plus evictable, less
        what admitted requests, this one included, will take): it drops as hits are locked and
        miss slots allocated, and must stay >= 0. Never raises: an error leaves the request to
        a normal prefill (the scheduler must keep serving).
        """
        try:
            self._admit(req, request, remaining_tokens)
        except Exception:
            logger.exception("request %s: chunk admission failed; prefilling it normally", req.rid)
            self.release(req.rid)

    def _admit(self, req: Req, request: ChunkRequest, remaining_tokens: Callable[[], int]) -> None:
        matches = self._match(req, request, req.prefix_len)
        state = RequestChunks(request, self._namespace(req, request), {
            "prefix_cached_tokens": int(req.prefix_len),
            "chunks": len(request.spans),
            "chunk_hits": sum(m.hit for m in matches),
            "chunk_misses": sum(not m.hit for m in matches),
        })
        self._requests[req.rid] = state
        if request.family:
            state.report["chunk_context_family"] = request.family
        elif request.context:
            state.report["chunk_context_tokens"] = len(request.context)
            state.context_namespace = self._context_namespace(req, request)
        # The chunk context's own KV is locked with the hits when a chunk missed (the misses
        # are computed after it), so the budget check below covers it too.
        context = self._match_context(req, state, matches)
        # Locking also counts each span once as a hit or a miss (the index's statistics), so it
        # happens for every admitted request; the locks go again at once if nothing will read them.
        locked = self._cache.chunk_index.lock(
            req.rid, [*matches, *([] if context is None else [context])])
        reason = self._why_not(req, request, matches)
        if not reason:
            reason = self._plan(req, state, matches, locked, remaining_tokens, context)
        state.report["blended"] = state.blend is not None
        if state.blend is None:
            state.report["reason"] = reason
            self._cache.chunk_index.unlock(req.rid)  # nothing will read them
            self._free_pending(state)
            return
        state.report["chunk_reused_tokens"] = state.blend.reused_tokens
        state.report["computed_standalone_tokens"] = sum(
            m.end - m.start for m in state.blend.misses
        )

    @staticmethod
    def _why_not(req: Req, request: ChunkRequest, matches: Sequence[ChunkMatch]) -> str:
        """Why the request cannot blend ("" if it may), whatever memory there is."""
        config = request.blend
        prompt_len = len(req.origin_input_ids)
        if config is None:
            return "the request does not blend"
        if getattr(req, "output_ids", None):
            return "a re-prefill after retraction is prefilled in full"
        extend_end = getattr(req, "extend_end", None)
        if extend_end is not None and extend_end < prompt_len:
            return "chunked prefill splits the prompt: prefilled in full"
        if not matches:
            return "no chunk outside the cached prefix"
        chunk_tokens = sum(m.end - m.start for m in matches)
        if chunk_tokens < config.min_reused_tokens:
            return (f"{chunk_tokens} chunk tokens outside the cached prefix, below "
                    f"min_reused_tokens={config.min_reused_tokens}")
        return ""

    def _plan(self, req: Req, state: RequestChunks, matches: Sequence[ChunkMatch],
              locked: LockResult, remaining_tokens: Callable[[], int],
              context: ChunkMatch | None = None) -> str:
        """With the hits locked: allocate miss slots and set ``state.blend``; else say why not.

        Chunk tokens count whether they hit or not: a missed chunk is computed standalone first
        (and cached for the next request), which is what makes it reusable at all. In a context
        family, only a chunk's precompute knows its context, so a missed chunk is prefilled in
        place instead (exact, not cached).
        """
        stale = set(locked.stale)  # evicted since the lookup: treat as misses
        if remaining_tokens() < 0:
            return (f"not enough KV memory to hold its {locked.newly_locked_len} chunk-hit tokens "
                    "beside its own prefill: prefilled in full")
        hits = tuple(ChunkHit(m.start, m.end, m.kv_loc, m.positions)
                     for i, m in enumerate(matches) if m.hit and i not in stale)
        missed = [m for i, m in enumerate(matches) if not m.hit or i in stale]
        loads, missed = self._load_from_store(req, state, missed, remaining_tokens)
        prefix = None
        if missed and state.request.context:
            context_hit = context is not None and context.hit and len(matches) not in stale
            prefix = self._context_prefix(state, context if context_hit else None,
                                          remaining_tokens)
        family = state.request.family
        if family and not hits and not loads:
            return (f"none of its chunks is in context family {family!r} (precompute them "
                    "there first): prefilled in full")
        misses = ()
        if not family and (prefix is not None or not state.request.context):
            misses = self._allocate_misses(req, state, missed, remaining_tokens, prefix)
        if prefix is not None:
            state.report["chunk_context_cached"] = prefix.ready
            if not misses:  # nothing will be computed after it
                prefix = None
        if not hits and not misses and not loads:
            return "no free KV slots to compute the missed chunks standalone"
        sources = Counter({POOL: sum(h.end - h.start for h in hits)})
        for load in loads:
            sources[load.tier] += load.end - load.start
        state.report["chunk_sources"] = {
            POOL: len(hits), **Counter(load.tier for load in loads),
            "computed": len(misses), "recomputed_in_place": len(missed) - len(misses)}
        config = self._choose_ratio(state, sources)
        state.blend = BlendRequest(hits, config, misses=misses,
                                   prompt_len=len(req.origin_input_ids), loads=loads,
                                   context=prefix)
        return ""

    def _choose_ratio(self, state: RequestChunks, sources: Counter) -> Any:
        """The request's blend config, with the Loading Controller's ratio when it sets it."""
        config = state.request.blend
        cache = self._cache
        if state.request.ratio_policy != "controller":
            return config
        if config.gradual:
            state.report["ratio_policy"] = "fixed (a gradual schedule keeps its own ratios)"
            return config
        choice = cache.loading_controller.choose(sources)
        state.report.update(choice.report())
        return dataclasses.replace(config, recompute_ratio=choice.ratio)

    def _load_from_store(self, req: Req, state: RequestChunks, missed: Sequence[ChunkMatch],
                         remaining_tokens: Callable[[], int],
                         ) -> tuple[tuple[ChunkLoad, ...], list[ChunkMatch]]:
        """Chunks the pool missed but a tier below it holds: read now, with fresh slots that
        the forward fills layer by layer. Returns the loads and the chunks still missing.

        Slots come out of the same live budget as misses; a chunk that does not fit, or whose
        stored entry does not fit this pool, stays a miss (computed, never served wrong).
        """
        cache = self._cache
        store = cache.chunk_store
        if store is None or not missed:
            return (), list(missed)
        allocator = cache.token_to_kv_pool_allocator
        pool = allocator.get_kvcache()
        loads, still_missed = [], []
        read_s = Counter()
        read_tokens = Counter()
        for match in missed:
            n = match.end - match.start
            token_ids = req.origin_input_ids[match.start:match.end]
            key = cache.store_key(state.namespace, token_ids)
            hit = None if n > remaining_tokens() else store.get(key)
            why = "" if hit is None else check_fits_pool(hit.kv, pool, token_ids)
            if why:
                logger.warning("request %s: stored chunk [%d, %d) from the %s tier not used (%s); "
                               "recomputed", req.rid, match.start, match.end, hit.tier, why)
            if hit is None or why:
                still_missed.append(match)
                continue
            slots = self._alloc(n)
            if slots is None:
                if hit.tier == "host":  # a host hit left host RAM: put it back
                    store.spill(key, hit.kv)
                still_missed.append(match)
                continue
            load = ChunkLoad(match.start, match.end, torch.tensor(token_ids, dtype=torch.int64),
                             slots, hit.kv, hit.tier)
            state.pending[id(load)] = load
            loads.append(load)
            read_s[hit.tier] += hit.read_s
            read_tokens[hit.tier] += n
        layers = int(pool.layer_num)
        for tier, seconds in read_s.items():
            cache.loading_controller.observe_read(tier, tokens=read_tokens[tier], layers=layers,
                                                  seconds=seconds)
        if loads:
            state.report["store_read_s"] = round(sum(read_s.values()), 6)
        return tuple(loads), still_missed

    def _allocate_misses(self, req: Req, state: RequestChunks, misses: Sequence[ChunkMatch],
                         remaining_tokens: Callable[[], int],
                         context: ContextPrefix | None = None) -> tuple[ChunkMiss, ...]:
        """Slots (sink + chunk, or just the chunk after a ``context``) for each missed chunk,
        as far as the admission budget allows.

        The budget is live, so requests admitted after this one see these slots as taken. A
        chunk that does not fit is recomputed in place as an ordinary uncached span (the blend
        stays correct, the chunk is just not cached).
        """
        if not misses:
            return ()
        sink = () if context is not None else state.request.sink
        out = []
        for match in misses:
            need = len(sink) + match.end - match.start
            if need > remaining_tokens():
                break
            slots = self._alloc(need)
            if slots is None:
                break
            miss = ChunkMiss(
                match.start, match.end,
                torch.tensor(req.origin_input_ids[match.start:match.end], dtype=torch.int64),
                sink, slots[: len(sink)], slots[len(sink):], context=context,
            )
            state.pending[id(miss)] = miss
            out.append(miss)
        return tuple(out)

    def _alloc(self, n: int) -> torch.Tensor | None:
        """``n`` fresh slots, evicting unlocked KV first when the pool is short (None if even
        that does not free enough). The caller has checked the admission budget."""
        allocator = self._cache.token_to_kv_pool_allocator
        if allocator.available_size() < n:
            self._cache.evict(EvictParams(num_tokens=n - allocator.available_size()))
        return allocator.alloc(n)

    def _match_context(self, req: Req, state: RequestChunks,
                       matches: Sequence[ChunkMatch]) -> ChunkMatch | None:
        """The chunk context's own index entry, looked up when the request has a context and
        a chunk the pool missed (None otherwise)."""
        if state.context_namespace is None or all(m.hit for m in matches):
            return None
        ids = state.request.prefix_ids
        return self._cache.chunk_index.match(state.context_namespace, ids, [(0, len(ids))])[0]

    def _context_prefix(self, state: RequestChunks, hit: ChunkMatch | None,
                        remaining_tokens: Callable[[], int]) -> ContextPrefix | None:
        """The KV the misses are computed after: the index's (locked at admission) or fresh
        slots the forward fills first; None when those do not fit the budget (the misses are
        then recomputed in place)."""
        ids = torch.tensor(state.request.prefix_ids, dtype=torch.int64)
        if hit is not None:
            return ContextPrefix(ids, hit.kv_loc, ready=True)
        if ids.numel() > remaining_tokens():
            return None
        slots = self._alloc(ids.numel())
        if slots is None:
            return None
        prefix = ContextPrefix(ids, slots, ready=False)
        state.pending[id(prefix)] = prefix
        return prefix

    def _context_namespace(self, req: Req, request: ChunkRequest) -> ChunkNamespace:
        """Where the chunk context's own KV lives in the index: apart from every chunk's."""
        return self._cache.chunk_namespace(
            cache_salt=req.cache_salt, extra_key=chunk_extra_key(req.extra_key),
            variant=prefix_variant(request.variant),
        )

    # ------------------------------------------------------------------ model side

    def blend_request(self, rid: Hashable) -> BlendRequest | None:
        """The blend decided at admission, if any (``BlendRequestSource``)."""
        state = self._requests.get(rid)
        return None if state is None else state.blend

    def blend_report(self, rid: Hashable) -> dict[str, object] | None:
        """What the cache decided for a chunked request (``meta_info["cacheblend"]``)."""
        state = self._requests.get(rid)
        return None if state is None else state.report

    def store_computed_chunk(self, rid: Hashable, miss: ChunkMiss) -> None:
        """Take a missed chunk's standalone KV (computed by the model) into the index.

        The entry is locked for ``rid`` like a hit; the sink slots are freed, and so are the
        chunk slots if an equal chunk got into the index first.
        """
        state = self._requests.get(rid)
        if state is None or state.pending.pop(id(miss), None) is None:
            raise KeyError(f"request {rid}: chunk [{miss.start}, {miss.end}) is not pending")
        allocator = self._cache.token_to_kv_pool_allocator
        if miss.sink_loc.numel():
            allocator.free_segment(miss.sink_loc, start_pos=0)
        result = self._cache.insert_chunk(
            state.namespace, miss.token_ids.tolist(), miss.kv_loc, miss.prefix_len, rid=rid
        )
        if result.redundant_loc is not None:
            allocator.free_segment(result.redundant_loc, start_pos=0)

    def store_context(self, rid: Hashable, context: ContextPrefix) -> None:
        """Take the chunk context's KV (computed by the model first) into the index, locked for
        ``rid``; it is cheap to recompute, so it is not written to the store's tiers."""
        state = self._requests.get(rid)
        if state is None or state.pending.pop(id(context), None) is None:
            raise KeyError(f"request {rid}: the chunk context is not pending")
        result = self._cache.insert_chunk(
            state.context_namespace, context.token_ids.tolist(), context.kv_loc, 0,
            rid=rid, persist=False)
        if result.redundant_loc is not None:
            self._cache.token_to_kv_pool_allocator.free_segment(result.redundant_loc,
                                                                start_pos=0)

    def store_loaded_chunk(self, rid: Hashable, load: ChunkLoad) -> None:
        """Take a chunk loaded from a tier below the pool (now in its slots) into the index,
        locked for ``rid`` like a hit; not written back to the tiers (it came from them)."""
        state = self._requests.get(rid)
        if state is None or state.pending.pop(id(load), None) is None:
            raise KeyError(f"request {rid}: chunk [{load.start}, {load.end}) is not pending")
        result = self._cache.insert_chunk(state.namespace, load.token_ids.tolist(), load.kv_loc,
                                          load.kv.positions.clone(), rid=rid, persist=False)
        if result.redundant_loc is not None:
            self._cache.token_to_kv_pool_allocator.free_segment(result.redundant_loc,
                                                                start_pos=0)

    def record_load(self, rid: Hashable, *, tokens: int, load_s: float, compute_s: float,
                    computed_rows: int) -> None:
        """A blended forward's measured speeds, for the Loading Controller."""
        controller = self._cache.loading_controller
        layers = int(self._cache.token_to_kv_pool_allocator.get_kvcache().layer_num)
        controller.observe_seed(tokens=tokens, layers=layers, seconds=load_s)
        controller.observe_compute(rows=computed_rows, seconds=compute_s)

    def finish_forward(self, rid: Hashable, *, blended: bool, reason: str = "") -> None:
        """After the request's extend forward: drop its blend (no later forward of it blends),
        release its chunk locks (its own slots hold the KV now), free miss slots the forward
        did not fill, and correct the report when the forward did not blend after all."""
        state = self._requests.get(rid)
        if state is None or state.blend is None:
            return
        state.blend = None
        self._free_pending(state)
        self._cache.chunk_index.unlock(rid)
        if not blended:
            state.report.update(blended=False, reason=reason)

    # ------------------------------------------------------------------ precompute and release

    def hand_off_precompute(self, req: Req, request: ChunkRequest, up_to: int) -> None:
        """Move a finished precompute request's chunk slots from its row to the chunk index.

        A standalone precompute matched no prefix, so it owns its whole row; one after a chunk
        context owns it from its matched prefix (``protected``, at most ``start``) on:

        ===============  ============================  ========================================
        row positions    KV of                         after this call
        ===============  ============================  ========================================
        [0, start)       the sink (and the context)    freed here; with a context: into the
                                                       prefix tree (the next precompute's
                                                       prefix), duplicates freed; a family
                                                       member's own context: freed
        [start, end)     the chunk, at those positions owned by the index (a duplicate: freed)
        [end, up_to)     generated tokens, if any      freed here
        [up_to, ...)     over-allocation               freed by ``release_kv_cache``
        ===============  ============================  ========================================

        ``cache_protected_len`` becomes ``up_to``, so ``release_kv_cache`` frees none of
        ``[0, up_to)`` again: every slot has exactly one owner.
        """
        cache = self._cache
        ((start, end),) = request.spans
        protected = req.kv.cache_protected_len
        if cache.page_size != 1 or protected > start or end > up_to:
            logger.error(
                "request %s: chunk [%d, %d) not stored (page_size %d, protected %d, kv %d)",
                req.rid, start, end, cache.page_size, protected, up_to,
            )
            return
        row = cache.req_to_token_pool.req_to_token[req.kv.req_pool_idx, :up_to].to(torch.int64)
        result = cache.insert_chunk(
            self._namespace(req, request), req.origin_input_ids[start:end],
            row[start:end].clone(), start,
        )
        ranges = [(end if result.redundant_loc is None else start, up_to)]
        if request.context and not request.family:  # a family member's context is its own
            cache.insert_prefix(req, start)
        else:
            ranges.insert(0, (protected, start))
        cache.free_kv_row(req.kv, [(lo, hi) for lo, hi in ranges if lo < hi])
        req.kv.cache_protected_len = up_to

    def release(self, rid: Hashable) -> None:
        """Forget a request: free the slots of its misses that never reached the index and
        unlock every chunk it holds. Idempotent; called on finish, abort and retraction."""
        state = self._requests.pop(rid, None)
        if state is not None:
            self._free_pending(state)
        self._cache.chunk_index.unlock(rid)

    def _free_pending(self, state: RequestChunks) -> None:
        allocator = self._cache.token_to_kv_pool_allocator
        for pending in state.pending.values():
            if isinstance(pending, ChunkMiss) and pending.sink_loc.numel():
                allocator.free_segment(pending.sink_loc, start_pos=0)
            allocator.free_segment(pending.kv_loc, start_pos=0)
        state.pending.clear()

    def reset(self) -> None:
        """Drop every request's state; their slots go back with ``allocator.clear()``."""
        self._requests.clear()

    # ------------------------------------------------------------------ helpers

    def _match(self, req: Req, request: ChunkRequest, prefix_len: int) -> list[ChunkMatch]:
        spans = [(start, end) for start, end in request.spans if end > prefix_len]
        if not spans:
            return []
        return self._cache.chunk_index.match(
            self._namespace(req, request), req.origin_input_ids, spans
        )

    def _namespace(self, req: Req, request: ChunkRequest) -> ChunkNamespace:
        """A request's chunk namespace: its caller's ``extra_key``, not its blend key."""
        return self._cache.chunk_namespace(
            cache_salt=req.cache_salt, extra_key=chunk_extra_key(req.extra_key),
            variant=request.variant,
        )
