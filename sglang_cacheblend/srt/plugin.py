"""The SGLang plugin entry point (group ``sglang.srt.plugins``, name ``cacheblend``).

SGLang calls ``register()`` in its main process and in every scheduler and detokenizer process
before any engine object is built, then applies the hooks registered here.
"""

from __future__ import annotations

import logging

logger = logging.getLogger(__name__)


def register() -> None:
    from sglang_cacheblend.srt.hooks import register_hooks

    register_hooks()
    logger.info("sglang-cacheblend plugin registered")
