"""Context-conditioned chunk KV: a chunk computed after a fixed preceding context.

A chunk computed right after a one-token sink has KV unlike the same chunk deep inside a
prompt: every one of its rows attended only to itself and the sink. Blending then has to repair
every reused row, and recomputing 15% of them cannot (the oracle ceiling on standalone KV is
~59%). Computing each chunk after the sink *plus* some preceding text, and keeping only the
chunk's own rows, moves all of them closer to what they are in a real prompt; on SmolLM2 the
gain comes mostly from there being *some* text before the chunk, not from relevant text (the
calibration in issue 17), so one shared context serves every chunk, and its KV is computed once.

A *context family* is the other way: each chunk gets a context of its own (random corpus
passages, its retrieval neighbours, anything a client computes), given with the chunk's
precompute request; every chunk of the family is then found under one name, whatever its
context was, so a request asks for "the family" without knowing each chunk's neighbours.

This module is the pure part: the chunk-namespace variants that name KV computed after a
context or in a family, so chunk KV of different kinds never mixes in the index or in the
store's tiers (which text a server uses is :mod:`sglang_cacheblend.context_text`, a setting's
value). No torch, no SGLang.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Sequence

from sglang_cacheblend.chunks.tokenization import sink_variant

__all__ = [
    "CONTEXT_CHOICES", "MAX_CONTEXT_IDS", "check_context_ids", "check_family", "context_variant",
    "family_variant", "prefix_variant",
]

CONTEXT_CHOICES = ("server", "none")
"""A request's ``chunk_context``: the server's context, or standalone chunk KV (none)."""
MAX_CONTEXT_IDS = 65536
"""Most context ids one precompute may carry (the model's context length limits it further)."""
_FAMILY_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.:-]{0,63}")


def context_variant(sink: Sequence[int], context: Sequence[int]) -> str:
    """Chunk-namespace variant of KV computed after ``sink + context`` (both then dropped).

    Without a context this is :func:`sink_variant`, so standalone chunk KV keeps its keys
    (and the entries already in a store's tiers). With one, the context's length and a digest
    of its ids name it: chunk KV computed after another context is different KV.
    """
    base = sink_variant(sink)
    if not context:
        return base
    raw = b"".join(int(t).to_bytes(4, "little", signed=False) for t in context)
    digest = hashlib.blake2b(raw, digest_size=8).hexdigest()
    return f"{base}+context:{len(context)}:{digest}"


def prefix_variant(variant: str) -> str:
    """Namespace variant of the context's own KV (sink + context at positions 0..) in the
    chunk index, kept apart from every chunk's."""
    return "context-prefix-of:" + variant


def family_variant(sink: Sequence[int], family: str) -> str:
    """Chunk-namespace variant of a context family: chunk KV each computed after ``sink`` and
    a context of its own that its precompute request gave. The name alone identifies the
    family (its chunks' contexts differ), so the client that fills a family owns its meaning."""
    return f"{sink_variant(sink)}+family:{check_family(family)}"


def check_family(name: object) -> str:
    """``name`` if it is a valid family name (1-64 of ``A-Za-z0-9_.:-``, starting with a
    letter or digit); ``ValueError`` naming the problem otherwise."""
    if not isinstance(name, str) or not _FAMILY_NAME.fullmatch(name):
        raise ValueError(f"context_family must be 1-64 characters of A-Za-z0-9_.:- starting "
                         f"with a letter or digit, got {name!r}")
    return name


def check_context_ids(ids: object) -> tuple[int, ...]:
    """A precompute's ``context_ids`` as a tuple: a non-empty list of non-negative integers,
    at most :data:`MAX_CONTEXT_IDS` (the vocabulary is checked where the model is known)."""
    if not isinstance(ids, (list, tuple)) or not ids:
        raise ValueError(f"context_ids must be a non-empty list of token ids, got {ids!r:.80}")
    if len(ids) > MAX_CONTEXT_IDS:
        raise ValueError(f"context_ids holds {len(ids)} ids; at most {MAX_CONTEXT_IDS}")
    if not all(isinstance(t, int) and not isinstance(t, bool) and t >= 0 for t in ids):
        raise ValueError("context_ids must hold non-negative integer token ids only")
    return tuple(ids)
