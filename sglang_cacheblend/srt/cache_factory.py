"""The ``cacheblend`` radix-cache backend's factory: where one scheduler's CacheBlend is built.

Registered by the plugin as ``register_radix_cache_backend("cacheblend", create_cacheblend_cache)``.
It refuses what the cache cannot serve, builds the store's tiers and the Loading Controller from
the server's options, the cache over them, and attaches the cache's admission to the model.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Hashable
from typing import TYPE_CHECKING

from sglang_cacheblend.options import current_options
from sglang_cacheblend.srt.radix_cache import CacheBlendRadixCache, loading_controller_for
from sglang_cacheblend.store.config import build_store
from sglang_cacheblend.supported_setups import refuse_unsupported_setups

if TYPE_CHECKING:
    from sglang.srt.mem_cache.registry import TreeCacheBuildContext

__all__ = ["create_cacheblend_cache"]

logger = logging.getLogger(__name__)


def create_cacheblend_cache(ctx: TreeCacheBuildContext) -> CacheBlendRadixCache:
    """Factory for ``register_radix_cache_backend("cacheblend", ...)``, in each scheduler.

    Refuses, with ``ValueError`` (the scheduler then stops with that message), what this cache
    cannot serve: CacheBlend not enabled (the request hooks would be inert), hooks that did not
    apply in this process, hybrid SWA or mamba models, HiCache, and blend settings the served
    model cannot run.
    """
    from sglang_cacheblend.srt.hooks import verify_hooks_applied

    options = current_options()
    if not options.enabled:
        raise ValueError("--radix-cache-backend cacheblend is selected by --enable-cacheblend; "
                         "pass that flag instead")
    verify_hooks_applied()
    if ctx.server_args is not None:
        refuse_unsupported_setups(vars(ctx.server_args), options.store)
    if ctx.is_hybrid_swa or ctx.is_hybrid_ssm:
        raise ValueError("--radix-cache-backend cacheblend supports full-attention models only")
    if ctx.enable_hierarchical_cache:
        raise ValueError("--radix-cache-backend cacheblend does not support HiCache")
    num_layers = getattr(ctx.model_config, "num_hidden_layers", None)
    if num_layers is not None:
        options.blend.check_fits_model(
            num_layers, what="--cacheblend-check-layer / --cacheblend-gradual-end-layer")
    controller = loading_controller_for(options)
    cache = CacheBlendRadixCache(
        ctx.params, model_id=_model_path(ctx.model_config),
        revision=getattr(ctx.model_config, "revision", None),
        rope=_rope_signature(ctx.model_config), chunk_store=build_store(options.store),
        controller=controller,
    )
    model = ctx.tp_worker.model_runner.model if ctx.tp_worker is not None else None
    attach = getattr(model, "attach_blend_source", None)
    if callable(attach):
        attach(cache.admission)
    else:
        logger.warning("%s has no blended extend: chunk hits are looked up and locked, but "
                       "requests are prefilled in full", type(model).__name__)
    return cache


def _model_path(model_config) -> str:
    return str(getattr(model_config, "model_path", None) or "model")


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
