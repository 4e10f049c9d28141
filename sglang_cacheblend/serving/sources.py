"""Where each chunk's KV comes from when the pool missed it: a tier below the pool, or fresh
slots the forward fills (after the sink, or after the chunk context, whose own KV is an index
entry or fresh slots too).

Everything here allocates out of the same live admission budget (``remaining_tokens()``), so
requests admitted later see these slots as taken; what does not fit stays a miss, or is
recomputed in place as an ordinary uncached span: never served wrong, never over-committed.
Slots allocated here are *pending* in the request's :class:`AdmissionState` until the forward
hands them to the index (:mod:`.handoff`) or admission frees them.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

from sglang_cacheblend.serving.blend_request import ChunkLoad, ChunkMiss, ContextPrefix
from sglang_cacheblend.serving.controller import LoadingController
from sglang_cacheblend.serving.pool_io import check_fits_pool

if TYPE_CHECKING:
    from radix_ext import ChunkMatch, ChunkNamespace
    from sglang_cacheblend.serving.blend_request import BlendRequest
    from sglang_cacheblend.serving.layout import ChunkLayout
    from sglang_cacheblend.serving.pool import ChunkPool, RequestView
    from sglang_cacheblend.store import ChunkStore

__all__ = ["AdmissionState", "ChunkSources"]

logger = logging.getLogger(__name__)

Budget = Callable[[], int]


@dataclass
class AdmissionState:
    """What the scheduler side decided for one admitted chunked request.

    ``report`` is its accounting (``meta_info["cacheblend"]``); ``blend`` the blend the model
    runs, if any; ``pending`` the missed, loaded or context KV whose slots were allocated and
    that has not reached the index yet (freed on release if it never does).
    """

    layout: ChunkLayout
    namespace: ChunkNamespace
    report: dict[str, object]
    blend: BlendRequest | None = None
    pending: list[ChunkMiss | ChunkLoad | ContextPrefix] = field(default_factory=list)
    context_namespace: ChunkNamespace | None = None  # the chunk context's own KV, if any

    def take_pending(self, item: ChunkMiss | ChunkLoad | ContextPrefix) -> None:
        """``item`` leaves the pending list (its slots have a new owner); KeyError if absent."""
        for i, pending in enumerate(self.pending):
            if pending is item:
                del self.pending[i]
                return
        raise KeyError(f"{type(item).__name__} is not pending")


class ChunkSources:
    """Slots and loads for the chunks a request's pool lookup missed."""

    def __init__(self, pool: ChunkPool, store: ChunkStore | None,
                 controller: LoadingController,
                 store_key: Callable[[Hashable, Sequence[int]], str]) -> None:
        self._pool = pool
        self._store = store
        self._controller = controller
        self._store_key = store_key

    def load(self, view: RequestView, state: AdmissionState, missed: Sequence[ChunkMatch],
             remaining_tokens: Budget) -> tuple[tuple[ChunkLoad, ...], list[ChunkMatch]]:
        """Chunks the pool missed but a tier below it holds: read now, with fresh slots that
        the forward fills layer by layer. Returns the loads and the chunks still missing.

        A chunk that does not fit the budget, or whose stored entry does not fit this pool,
        stays a miss (computed, never served wrong).
        """
        store = self._store
        if store is None or not missed:
            return (), list(missed)
        pool = self._pool.kv_cache()
        loads, still_missed = [], []
        read_s, read_tokens = Counter(), Counter()
        for match in missed:
            n = match.end - match.start
            token_ids = list(view.prompt_ids[match.start:match.end])
            key = self._store_key(state.namespace, token_ids)
            hit = None if n > remaining_tokens() else store.get(key)
            why = "" if hit is None else check_fits_pool(hit.kv, pool, token_ids)
            if why:
                logger.warning("request %s: stored chunk [%d, %d) from the %s tier not used (%s); "
                               "recomputed", view.rid, match.start, match.end, hit.tier, why)
            slots = None if hit is None or why else self._pool.alloc(n)
            if slots is None:
                if hit is not None and not why:
                    store.give_back(key, hit.kv, hit.tier)
                still_missed.append(match)
                continue
            load = ChunkLoad(match.start, match.end, torch.tensor(token_ids, dtype=torch.int64),
                             slots, hit.kv, hit.tier)
            state.pending.append(load)
            loads.append(load)
            read_s[hit.tier] += hit.read_s
            read_tokens[hit.tier] += n
        layers = int(pool.layer_num)
        for tier, seconds in read_s.items():
            self._controller.observe_read(tier, tokens=read_tokens[tier], layers=layers,
                                          seconds=seconds)
        if loads:
            state.report["store_read_s"] = round(sum(read_s.values()), 6)
        return tuple(loads), still_missed

    def misses(self, view: RequestView, state: AdmissionState, missed: Sequence[ChunkMatch],
               remaining_tokens: Budget,
               context: ContextPrefix | None = None) -> tuple[ChunkMiss, ...]:
        """Slots (sink + chunk, or just the chunk after a ``context``) for each missed chunk,
        as far as the budget allows; a chunk that does not fit is recomputed in place as an
        ordinary uncached span (the blend stays correct, the chunk is just not cached)."""
        sink = () if context is not None else state.layout.sink
        out = []
        for match in missed:
            need = len(sink) + match.end - match.start
            slots = None if need > remaining_tokens() else self._pool.alloc(need)
            if slots is None:
                break
            miss = ChunkMiss(
                match.start, match.end,
                torch.tensor(list(view.prompt_ids[match.start:match.end]), dtype=torch.int64),
                sink, slots[: len(sink)], slots[len(sink):], context=context,
            )
            state.pending.append(miss)
            out.append(miss)
        return tuple(out)

    def context_prefix(self, state: AdmissionState, hit: ChunkMatch | None,
                       remaining_tokens: Budget) -> ContextPrefix | None:
        """The KV the misses are computed after: the index's (locked at admission) or fresh
        slots the forward fills first; None when those do not fit the budget (the misses are
        then recomputed in place)."""
        ids = torch.tensor(state.layout.prefix_ids, dtype=torch.int64)
        if hit is not None:
            return ContextPrefix(ids, hit.kv_loc, ready=True)
        slots = None if ids.numel() > remaining_tokens() else self._pool.alloc(ids.numel())
        if slots is None:
            return None
        prefix = ContextPrefix(ids, slots, ready=False)
        state.pending.append(prefix)
        return prefix

    def free_pending(self, state: AdmissionState) -> None:
        """Free the slots of every pending item; a load goes back to its tier (a host-tier read
        takes the entry out of host RAM)."""
        for pending in state.pending:
            if isinstance(pending, ChunkMiss) and pending.sink_loc.numel():
                self._pool.free(pending.sink_loc)
            if isinstance(pending, ChunkLoad) and self._store is not None:
                key = self._store_key(state.namespace, pending.token_ids.tolist())
                self._store.give_back(key, pending.kv, pending.tier)
            self._pool.free(pending.kv_loc)
        state.pending.clear()

