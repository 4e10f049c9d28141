"""What a scheduler process reports about CacheBlend in ``GET /server_info``.

Under ``internal_states[i].cacheblend``: the options it runs with, its tree cache, the KV pool
accounting (the scheduler's leak check holds when available + evictable + protected == total),
the chunk index's counters and the blended extends' totals (no request's id or figures). The
report
reads scheduler internals, so it is guarded: a renamed attribute costs the report, never the
scheduler (whose request loop runs this handler).
"""

from __future__ import annotations

import logging
import os
from dataclasses import asdict
from typing import Any

from sglang_cacheblend.options import current_options

__all__ = ["report_cacheblend_state"]

logger = logging.getLogger(__name__)


def report_cacheblend_state(result: Any, controller: Any, *args: Any, **kwargs: Any) -> Any:
    """AFTER ``SchedulerInternalStateController.get_internal_state``."""
    options = current_options()
    if not options.enabled:
        return result
    try:
        result.internal_state["cacheblend"] = _report(controller.scheduler, options)
    except Exception as exc:  # noqa: BLE001 - the report must never take the scheduler down
        logger.exception("CacheBlend /server_info report failed")
        result.internal_state["cacheblend"] = {"plugin_loaded": True, "error": repr(exc)}
    return result


def _report(scheduler: Any, options: Any) -> dict[str, Any]:
    tree_cache = scheduler.tree_cache
    model = scheduler.tp_worker.model_runner.model
    report: dict[str, Any] = {
        "plugin_loaded": True,
        "pid": os.getpid(),
        **asdict(options),
        "tree_cache": type(tree_cache).__name__,
        "model_class": f"{type(model).__module__}.{type(model).__qualname__}",
        "token_pool": {
            "total": scheduler.max_total_num_tokens,
            "available": scheduler.token_to_kv_pool_allocator.available_size(),
            "evictable": tree_cache.evictable_size(),
            "protected": tree_cache.protected_size(),
        },
        # Totals only: /server_info shows no request's id or figures (G11 of the second
        # review); a request's own accounting is in its meta_info["cacheblend"].
        "blend_totals": dict(getattr(model, "blend_totals", {})),
    }
    chunk_stats = getattr(tree_cache, "chunk_stats", None)
    if callable(chunk_stats):
        report["chunk_index"] = asdict(chunk_stats())
    store_report = getattr(tree_cache, "store_report", None)
    if callable(store_report):
        report["store"] = store_report()
    return report
