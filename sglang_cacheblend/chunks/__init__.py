"""Marking reusable chunks in a prompt, for clients and for the server glue alike.

A chunk is tokenized on its own, so its token ids never depend on its neighbours; the prompt
becomes ``prefix + chunk_1 + ... + chunk_k + suffix`` with known ``[start, end)`` spans. Three
ways to mark chunks, one meaning: text markers (:mod:`.markers`), explicit spans over
``input_ids`` in ``kv_hints`` (:mod:`.hints`), and precompute requests. Every module here is
pure Python: no torch, no SGLang (a test enforces it).
"""

from sglang_cacheblend.chunks.client import precompute_chunks
from sglang_cacheblend.chunks.context import (
    CONTEXT_CHOICES,
    check_context_ids,
    check_family,
    context_variant,
    family_variant,
    prefix_variant,
)
from sglang_cacheblend.chunks.hints import (
    ACTION_CHUNKS,
    ACTION_PRECOMPUTE,
    ACTION_TYPES,
    ACTION_VERSION,
    ClientAction,
    chunk_hints,
    precompute_hints,
    read_client_action,
)
from sglang_cacheblend.chunks.markers import (
    CHUNK_CLOSE,
    CHUNK_OPEN,
    Segment,
    chunk,
    contains_markers,
    split_chunks,
    strip_markers,
)
from sglang_cacheblend.chunks.spans import ChunkedPrompt, Span, validate_spans
from sglang_cacheblend.chunks.tokenization import (
    Encode,
    precompute_prompt,
    sink_ids,
    sink_variant,
    special_affixes,
    tokenize_segments,
)

__all__ = [
    "ACTION_CHUNKS", "ACTION_PRECOMPUTE", "ACTION_TYPES", "ACTION_VERSION", "CHUNK_CLOSE",
    "CHUNK_OPEN", "CONTEXT_CHOICES", "ChunkedPrompt", "ClientAction", "Encode", "Segment",
    "Span", "check_context_ids", "check_family", "chunk", "chunk_hints", "contains_markers",
    "context_variant", "family_variant", "precompute_chunks", "precompute_hints",
    "precompute_prompt", "prefix_variant", "read_client_action", "sink_ids", "sink_variant",
    "special_affixes", "split_chunks", "strip_markers", "tokenize_segments", "validate_spans",
]
