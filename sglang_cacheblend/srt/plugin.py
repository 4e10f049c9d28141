"""The SGLang plugin entry point (group ``sglang.srt.plugins``, name ``cacheblend``).

SGLang calls ``register()`` in its main process and in every scheduler and detokenizer process
before any engine object is built, then applies the hooks registered here.
"""

from __future__ import annotations

import logging

logger = logging.getLogger(__name__)


def register() -> None:
    from sglang.srt.mem_cache.registry import register_radix_cache_backend

    from sglang_cacheblend.options import RADIX_BACKEND_NAME
    from sglang_cacheblend.srt.cache_factory import create_cacheblend_cache
    from sglang_cacheblend.srt.hooks import register_hooks

    register_hooks()
    try:
        register_radix_cache_backend(RADIX_BACKEND_NAME, create_cacheblend_cache)
    except ValueError:
        pass  # already registered in this process: load_plugins may run more than once
    logger.info("sglang-cacheblend plugin registered")
