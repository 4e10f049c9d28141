"""Per-request chunk admission: lock a request's chunk hits, plan its blend, take its outcome.

One :class:`~.sources.AdmissionState` per chunked request holds everything the scheduler side
decides about it, from admission to release; :class:`Admission` owns those for one cache and is
what the model reads (:class:`~.blend_request.BlendSource`). The life of a chunked request:

1. ``touch`` (each ``match_prefix``): look its spans up, so their access times move on; no lock.
2. ``admit`` (when SGLang admits it to prefill): lock the hits, read the chunks the pool missed
   from the store's tiers when they hold them, allocate slots for those loads and for the
   chunks still missing (:mod:`.sources`), and, under the controller policy, let the Loading
   Controller pick the ratio. Never over-commits the pool: SGLang's admission counted the hits
   as evictable, so the locks and the slots must fit in what its budget has left, or the
   request falls back to a normal prefill with its locks released.
3. ``finish`` (right after the request's extend forward, with its :class:`BlendOutcome`): the
   KV the forward computed or loaded goes to the index (:mod:`.handoff`), the speeds to the
   controller, the locks are released (the request's own slots hold the KV now) and no later
   forward of the request blends again.
4. ``release`` (finish, abort, retraction): locks released, slots never filled freed.

Nothing here trusts that the prompt SGLang runs is the one the tokenizer decided on: SGLang
may turn a request into a one-token abort stub or truncate it after tokenization. A layout is
used only on the exact prompt it was decided for (:meth:`ChunkLayout.fits_prompt`); any other
request is prefilled unblended, and says why. No exception from one request's chunk handling
leaves this class.
"""

from __future__ import annotations

import dataclasses
import logging
from collections import Counter
from collections.abc import Callable, Hashable, Sequence
from typing import TYPE_CHECKING, Any

from sglang_cacheblend.chunks import prefix_variant
from sglang_cacheblend.serving.blend_namespace import chunk_extra_key
from sglang_cacheblend.serving.blend_request import BlendOutcome, BlendRequest, ChunkHit
from sglang_cacheblend.serving.controller import POOL, LoadingController
from sglang_cacheblend.serving.handoff import ChunkHandoff
from sglang_cacheblend.serving.sources import AdmissionState, Budget, ChunkSources

if TYPE_CHECKING:
    from radix_ext import ChunkIndex, ChunkMatch, ChunkNamespace, LockResult
    from sglang_cacheblend.serving.layout import ChunkLayout
    from sglang_cacheblend.serving.pool import ChunkPool, RequestView
    from sglang_cacheblend.store import ChunkStore

__all__ = ["PROMPT_CHANGED", "Admission"]

logger = logging.getLogger(__name__)

PROMPT_CHANGED = ("SGLang changed the prompt after tokenization (an abort stub or a truncation):"
                  " prefilled unblended")

NamespaceOf = Callable[..., "ChunkNamespace"]


class Admission:
    """Admission, blend planning and release of chunked requests on one pool and index.

    ``namespace_of(cache_salt=, extra_key=, variant=)`` builds a chunk namespace of the served
    model; ``store_key(namespace, token_ids)`` a chunk's key in the store's tiers.
    """

    def __init__(self, *, index: ChunkIndex, pool: ChunkPool, namespace_of: NamespaceOf,
                 store_key: Callable[[Hashable, Sequence[int]], str],
                 controller: LoadingController, handoff: ChunkHandoff,
                 store: ChunkStore | None = None) -> None:
        self._index = index
        self._pool = pool
        self._namespace_of = namespace_of
        self.controller = controller
        self.sources = ChunkSources(pool, store, self.controller, store_key)
        self.handoff = handoff
        self._requests: dict[Hashable, AdmissionState] = {}

    # ------------------------------------------------------------------ scheduler side

    def touch(self, view: RequestView, layout: ChunkLayout) -> None:
        """Look the request's spans past the exact prefix up; only access times change.
        Never raises; a request whose prompt is not the layout's is not looked up."""
        try:
            if layout.spans_inside(len(view.prompt_ids)) and not view.ending:
                self._match(view, layout, view.prefix_len)
        except Exception:  # noqa: BLE001 - never into the scheduler loop
            logger.exception("request %s: chunk lookup failed (ignored)", view.rid)

    def admit(self, view: RequestView, layout: ChunkLayout, *, remaining_tokens: Budget) -> None:
        """Lock the chunk hits of a request just admitted to prefill and decide its blend.

        ``remaining_tokens()`` is SGLang's live admission budget (free plus evictable, less
        what admitted requests, this one included, will take): it drops as hits are locked and
        slots allocated, and must stay >= 0. Never raises: an error leaves the request to a
        normal prefill (the scheduler must keep serving).
        """
        try:
            self._admit(view, layout, remaining_tokens)
        except Exception:  # noqa: BLE001 - never into the scheduler loop
            logger.exception("request %s: chunk admission failed; prefilling it normally",
                             view.rid)
            self.release(view.rid)

    def _admit(self, view: RequestView, layout: ChunkLayout, remaining_tokens: Budget) -> None:
        self.release(view.rid)  # a re-admission (after retraction) starts clean
        report: dict[str, object] = {"prefix_cached_tokens": int(view.prefix_len),
                                     "chunks": len(layout.spans)}
        state = AdmissionState(layout, self.namespace_for(view, layout.variant), report)
        self._requests[view.rid] = state
        if view.ending or not layout.fits_prompt(view.prompt_ids):
            report.update(blended=False, reason=PROMPT_CHANGED)
            return
        matches = self._match(view, layout, view.prefix_len)
        report.update(chunk_hits=sum(m.hit for m in matches),
                      chunk_misses=sum(not m.hit for m in matches))
        if layout.family:
            report["chunk_context_family"] = layout.family
        elif layout.context:
            report["chunk_context_tokens"] = len(layout.context)
            state.context_namespace = self.namespace_for(view, prefix_variant(layout.variant))
        # The chunk context's own KV is locked with the hits when a chunk missed (the misses
        # are computed after it), so the budget check below covers it too.
        context = self._match_context(state, matches)
        # Locking also counts each span once as a hit or a miss (the index's statistics), so it
        # happens for every admitted request; the locks go again at once if nothing reads them.
        locked = self._index.lock(view.rid, [*matches, *([] if context is None else [context])])
        reason = _why_not(view, layout, matches)
        if not reason:
            reason = self._plan(view, state, matches, locked, remaining_tokens, context)
        report["blended"] = state.blend is not None
        if state.blend is None:
            report["reason"] = reason
            self._index.unlock(view.rid)  # nothing will read them
            self.sources.free_pending(state)
            return
        report["chunk_reused_tokens"] = state.blend.reused_tokens
        report["computed_standalone_tokens"] = sum(m.end - m.start for m in state.blend.misses)

    def _plan(self, view: RequestView, state: AdmissionState, matches: Sequence[ChunkMatch],
              locked: LockResult, remaining_tokens: Budget,
              context: ChunkMatch | None = None) -> str:
        """With the hits locked: take slots for loads and misses and set ``state.blend``; else
        say why not.

        Chunk tokens count whether they hit or not: a missed chunk is computed first (and
        cached for the next request), which is what makes it reusable at all. In a context
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
        loads, missed = self.sources.load(view, state, missed, remaining_tokens)
        layout = state.layout
        prefix = None
        if missed and layout.context:
            context_hit = context is not None and context.hit and len(matches) not in stale
            prefix = self.sources.context_prefix(state, context if context_hit else None,
                                                 remaining_tokens)
        if layout.family and not hits and not loads:
            return (f"none of its chunks is in context family {layout.family!r} (precompute "
                    "them there first): prefilled in full")
        misses = ()
        if not layout.family and (prefix is not None or not layout.context):
            misses = self.sources.misses(view, state, missed, remaining_tokens, prefix)
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
                                   prompt_len=len(view.prompt_ids), loads=loads,
                                   context=prefix)
        return ""

    def _choose_ratio(self, state: AdmissionState, sources: Counter) -> Any:
        """The request's blend config, with the Loading Controller's ratio when it sets it."""
        config = state.layout.blend
        if state.layout.ratio_policy != "controller":
            return config
        if config.gradual:
            state.report["ratio_policy"] = "fixed (a gradual schedule keeps its own ratios)"
            return config
        choice = self.controller.choose(sources)
        state.report.update(choice.report())
        return dataclasses.replace(config, recompute_ratio=choice.ratio)

    def _match_context(self, state: AdmissionState,
                       matches: Sequence[ChunkMatch]) -> ChunkMatch | None:
        """The chunk context's own index entry, looked up when the request has a context and
        a chunk the pool missed (None otherwise)."""
        if state.context_namespace is None or all(m.hit for m in matches):
            return None
        ids = state.layout.prefix_ids
        return self._index.match(state.context_namespace, ids, [(0, len(ids))])[0]

    # ------------------------------------------------------------------ model side

    def blend_request(self, rid: Hashable) -> BlendRequest | None:
        """The blend decided at admission, if any (``BlendSource``)."""
        state = self._requests.get(rid)
        return None if state is None else state.blend

    def blend_report(self, rid: Hashable) -> dict[str, object] | None:
        """What the cache decided for a chunked request (``meta_info["cacheblend"]``)."""
        state = self._requests.get(rid)
        return None if state is None else state.report

    def finish(self, rid: Hashable, outcome: BlendOutcome) -> None:
        """After the request's extend forward (``BlendSource``): adopt the KV it left for the
        index, record its speeds, drop the blend (no later forward of it blends), release its
        chunk locks and free what it did not use. Never raises."""
        state = self._requests.get(rid)
        if state is None or state.blend is None:
            return
        try:
            if outcome.blended:
                self.handoff.adopt(rid, state, outcome)
                self._record_speeds(outcome)
            else:
                state.report.update(blended=False, reason=outcome.reason)
        except Exception:  # noqa: BLE001 - never into the scheduler loop
            logger.exception("request %s: handing its chunk KV to the index failed", rid)
        finally:
            state.blend = None
            self.sources.free_pending(state)
            self._index.unlock(rid)

    def _record_speeds(self, outcome: BlendOutcome) -> None:
        layers = int(self._pool.kv_cache().layer_num)
        self.controller.observe_seed(tokens=outcome.seeded_tokens, layers=layers,
                                     seconds=outcome.load_s)
        self.controller.observe_compute(rows=outcome.computed_rows, seconds=outcome.compute_s)

    # ------------------------------------------------------------------ release

    def release(self, rid: Hashable) -> None:
        """Forget a request: free the slots it holds that never reached the index and unlock
        every chunk it holds. Idempotent; called on finish, abort and retraction."""
        state = self._requests.pop(rid, None)
        if state is not None:
            self.sources.free_pending(state)
        self._index.unlock(rid)

    def reset(self) -> None:
        """Drop every request's state; their slots go back with the pool's own reset."""
        self._requests.clear()

    # ------------------------------------------------------------------ helpers

    def _match(self, view: RequestView, layout: ChunkLayout,
               prefix_len: int) -> list[ChunkMatch]:
        spans = [(start, end) for start, end in layout.spans if end > prefix_len]
        if not spans:
            return []
        namespace = self.namespace_for(view, layout.variant)
        return self._index.match(namespace, view.prompt_ids, spans)

    def namespace_for(self, view: RequestView, variant: str) -> ChunkNamespace:
        """A chunk namespace of the request: its caller's ``extra_key``, not its blend key."""
        return self._namespace_of(cache_salt=view.cache_salt,
                                  extra_key=chunk_extra_key(view.extra_key), variant=variant)


def _why_not(view: RequestView, layout: ChunkLayout, matches: Sequence[ChunkMatch]) -> str:
    """Why the request cannot blend ("" if it may), whatever memory there is."""
    config = layout.blend
    if config is None:
        return "the request does not blend"
    if view.retracted:
        return "a re-prefill after retraction is prefilled in full"
    if view.extend_end is not None and view.extend_end < len(view.prompt_ids):
        return "chunked prefill splits the prompt: prefilled in full"
    if not matches:
        return "no chunk outside the cached prefix"
    chunk_tokens = sum(m.end - m.start for m in matches)
    if chunk_tokens < config.min_reused_tokens:
        return (f"{chunk_tokens} chunk tokens outside the cached prefix, below "
                f"min_reused_tokens={config.min_reused_tokens}")
    return ""
