"""Which prefix-tree namespace a blended request uses, so approximate KV stays among its kind.

Blended KV is approximate, so it must never become an exact-prefix hit of a request that did not
ask for it; but a follow-up turn of a blended conversation should reuse the previous turn's KV as
a prefix (multi-turn RAG). Both follow from one rule, applied where SGLang turns a request into
token ids (the tokenizer hook): a request that asks for blending gets the ``extra_key``
``blend_extra_key(extra_key, config)``. SGLang then matches and inserts its prefix under that key
on every path (``match_prefix``, ``cache_finished_req``, chunked prefill) with no further glue,
so blended requests with the same blend settings share blended prefixes, and nobody else sees
them. The chunk index keeps using the caller's own ``extra_key`` (chunk KV is exact), recovered
with :func:`chunk_extra_key`.

The key holds a digest of the blend settings that change the KV (ratio, selector, check layer,
gradual schedule...), so KV blended at ratio 0 is never served to a request asking for 0.15.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections.abc import Sequence

from sglang_cacheblend.config import BlendConfig

BLEND_KEY_PREFIX = "cacheblend:v1:"

# Settings that only decide WHETHER a request blends; its KV is the same either way.
_NOT_IN_KEY = frozenset({"min_reused_tokens"})


def config_digest(config: BlendConfig) -> str:
    """A short stable digest of the settings that decide a blended request's KV."""
    fields = {k: v for k, v in dataclasses.asdict(config).items() if k not in _NOT_IN_KEY}
    raw = json.dumps(fields, sort_keys=True, default=str).encode()
    return hashlib.blake2b(raw, digest_size=6).hexdigest()


def blend_extra_key(extra_key: str | None, config: BlendConfig, *,
                    controller: bool = False, chunk_context: Sequence[int] = (),
                    family: str = "") -> str:
    """The prefix-tree ``extra_key`` of a request blended with ``config``.

    With ``controller`` the ratio is the Loading Controller's, chosen later: the key says
    ``rauto`` instead of a ratio, so such KV is shared only among controller-blended requests.
    With a ``chunk_context`` (the ids chunk KV is computed after) the key names it too: the
    blend of context-conditioned chunk KV is other KV than the blend of standalone chunk KV;
    so does a context ``family``.

    Keeps the caller's ``extra_key`` (LoRA adapter, caller classification) after a ``|``, so
    blended prefixes are shared only among requests of the same kind. The ``|`` is always
    there: SGLang appends a LoRA id to the key as is, and it must land on the caller's side.
    """
    ratio = "auto" if controller else f"{config.recompute_ratio:g}"
    context = ""
    if chunk_context:
        raw = json.dumps([int(t) for t in chunk_context]).encode()
        context = ":c" + hashlib.blake2b(raw, digest_size=6).hexdigest()
    if family:
        context += ":f" + family
    return f"{BLEND_KEY_PREFIX}r{ratio}:{config_digest(config)}{context}|{extra_key or ''}"


def is_blend_extra_key(extra_key: str | None) -> bool:
    return bool(extra_key) and extra_key.startswith(BLEND_KEY_PREFIX)


def chunk_extra_key(extra_key: str | None) -> str | None:
    """The caller's own ``extra_key`` behind a blend key (``None`` if it had none)."""
    if not is_blend_extra_key(extra_key):
        return extra_key
    return extra_key.partition("|")[2] or None
