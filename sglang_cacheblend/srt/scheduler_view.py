"""SGLang's scheduler objects as :mod:`sglang_cacheblend.serving` sees them.

- :class:`SGLangChunkPool`: the token-to-KV allocator (with the cache's eviction) as a
  :class:`~sglang_cacheblend.serving.pool.ChunkPool`.
- :func:`request_view`: a scheduler ``Req`` as a
  :class:`~sglang_cacheblend.serving.pool.RequestView`, read at the moment it is called (SGLang
  rewrites ``origin_input_ids`` on abort and truncation).
- :func:`hand_off_precompute`: a finished precompute request's row split between the chunk
  index, the prefix tree and the pool (the table is
  :func:`~sglang_cacheblend.serving.handoff.precompute_free_ranges`).
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

import torch
from sglang.srt.mem_cache.base_prefix_cache import EvictParams

from sglang_cacheblend.serving.handoff import precompute_free_ranges
from sglang_cacheblend.serving.pool import RequestView

if TYPE_CHECKING:
    from sglang.srt.managers.schedule_batch import Req

    from sglang_cacheblend.serving.layout import ChunkLayout

__all__ = ["SGLangChunkPool", "hand_off_precompute", "request_view"]

logger = logging.getLogger(__name__)


class SGLangChunkPool:
    """Slots of SGLang's token-to-KV pool; ``alloc`` evicts through the cache when short."""

    def __init__(self, cache: Any) -> None:
        """``cache``: the ``cacheblend`` radix cache (its allocator and its ``evict``)."""
        self._cache = cache

    def alloc(self, num_tokens: int) -> torch.Tensor | None:
        allocator = self._cache.token_to_kv_pool_allocator
        if allocator.available_size() < num_tokens:
            self._cache.evict(EvictParams(num_tokens=num_tokens - allocator.available_size()))
        return allocator.alloc(num_tokens)

    def free(self, kv_loc: torch.Tensor) -> None:
        self._cache.token_to_kv_pool_allocator.free_segment(kv_loc, start_pos=0)

    def kv_cache(self) -> Any:
        return self._cache.token_to_kv_pool_allocator.get_kvcache()


def request_view(req: Req, *, prefix_len: int | None = None) -> RequestView:
    """``req`` as admission reads it now (``prefix_len`` defaults to ``req.prefix_len``)."""
    return RequestView(
        rid=req.rid,
        prompt_ids=req.origin_input_ids,
        prefix_len=int(req.prefix_len if prefix_len is None else prefix_len),
        cache_salt=getattr(req, "cache_salt", None),
        extra_key=getattr(req, "extra_key", None),
        ending=getattr(req, "to_finish", None) is not None or _finished(req),
        retracted=bool(getattr(req, "output_ids", None)),
        extend_end=getattr(req, "extend_end", None),
    )


def _finished(req: Req) -> bool:
    finished = getattr(req, "finished", None)
    return bool(finished()) if callable(finished) else False


def hand_off_precompute(cache: Any, req: Req, layout: ChunkLayout,
                        up_to: int) -> None:
    """Move a finished precompute request's chunk slots from its row to the chunk index, its
    sink and shared context into the prefix tree, and free the rest (see
    :func:`~sglang_cacheblend.serving.handoff.precompute_free_ranges`).

    ``cache`` is the ``cacheblend`` radix cache (its index hand-off, prefix tree and rows).
    Nothing is stored when the prompt the scheduler ran is not the one the layout was decided
    on (SGLang truncated or stubbed it): the row is then released as SGLang's own would be.
    """
    if not layout.fits_prompt(req.origin_input_ids):
        logger.error("request %s: precompute not stored: SGLang changed its prompt after "
                     "tokenization", req.rid)
        return
    ((start, end),) = layout.spans
    protected = req.kv.cache_protected_len
    if cache.page_size != 1 or protected > start or end > up_to:
        logger.error("request %s: chunk [%d, %d) not stored (page_size %d, protected %d, kv %d)",
                     req.rid, start, end, cache.page_size, protected, up_to)
        return
    row = cache.req_to_token_pool.req_to_token[req.kv.req_pool_idx, :up_to].to(torch.int64)
    namespace = cache.admission.namespace_for(request_view(req), layout.variant)
    result = cache.handoff.insert(namespace, list(req.origin_input_ids[start:end]),
                                row[start:end].clone(), start)
    keeps_prefix = bool(layout.context) and not layout.family  # a family's context is its own
    if keeps_prefix:
        cache.insert_prefix(req, start)
    ranges = precompute_free_ranges(start=start, end=end, protected=protected, up_to=up_to,
                                    chunk_inserted=result.redundant_loc is None,
                                    keeps_prefix=keeps_prefix)
    cache.free_kv_row(req.kv, ranges)
    req.kv.cache_protected_len = up_to
