"""Where chunk marking enters SGLang: the tokenizer manager's per-request tokenization.

``tokenize_with_chunks`` wraps ``TokenizerManager._tokenize_one_request``. A request with chunk
markers in its text, or with a CacheBlend ``kv_hints`` action, is tokenized here: every chunk on
its own (:mod:`sglang_cacheblend.chunks`), the tokenizer's own special tokens around the whole
prompt. Everything the client said about chunks is parsed and validated here, once, against
the final token ids and the served model, and replaced by one server-written
:class:`~sglang_cacheblend.serving.layout.ChunkLayout` that the scheduler trusts, bound to the
final token ids. Bad markers, spans or settings
raise ``ValueError``, which SGLang's HTTP layer answers with 400.

Both hooks here do nothing unless the server runs with ``--enable-cacheblend``.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from sglang.srt.managers.kv_hints import KvHintsEnvelope, decode_kv_hints_envelope

from sglang_cacheblend.chunks import (
    ACTION_TYPES,
    ClientAction,
    Segment,
    contains_markers,
    precompute_prompt,
    read_client_action,
    sink_ids,
    special_affixes,
    split_chunks,
    strip_markers,
    tokenize_segments,
    validate_spans,
)
from sglang_cacheblend.options import ServerOptions, current_options
from sglang_cacheblend.serving.blend_namespace import (
    BLEND_KEY_PREFIX,
    blend_extra_key,
    is_blend_extra_key,
)
from sglang_cacheblend.serving.blend_settings import effective_config, effective_ratio_policy
from sglang_cacheblend.serving.layout import ChunkLayout
from sglang_cacheblend.srt.layout_envelope import SERVER_ACTION, envelope_with

if TYPE_CHECKING:
    from sglang.srt.managers.io_struct import GenerateReqInput

__all__ = ["ChunkTokenizer", "keep_sequential_tokenization", "tokenize_with_chunks"]

logger = logging.getLogger(__name__)


class ChunkTokenizer:
    """The server's tokenizer as the chunk functions need it."""

    def __init__(self, tokenizer: Any) -> None:
        if tokenizer is None:
            raise ValueError("CacheBlend chunks need the server's tokenizer (skip_tokenizer_init)")
        self._tokenizer = tokenizer

    def plain(self, text: str) -> list[int]:
        return list(self._tokenizer.encode(text, add_special_tokens=False))

    def default(self, text: str) -> list[int]:
        return list(self._tokenizer.encode(text))

    def sink(self) -> tuple[int, ...]:
        return sink_ids(getattr(self._tokenizer, "bos_token_id", None), self.plain)

    def context(self, text: str) -> tuple[int, ...]:
        """The chunk context's ids (tokenized once per server text)."""
        return _context_ids(self._tokenizer, text) if text else ()


_CONTEXT_IDS: dict[tuple[int, str], tuple[int, ...]] = {}


def _context_ids(tokenizer: Any, text: str) -> tuple[int, ...]:
    key = (id(tokenizer), text)
    if key not in _CONTEXT_IDS:
        _CONTEXT_IDS[key] = tuple(tokenizer.encode(text, add_special_tokens=False))
    return _CONTEXT_IDS[key]


async def tokenize_with_chunks(original: Callable[..., Any], manager: Any, obj: Any) -> Any:
    """AROUND ``TokenizerManager._tokenize_one_request``: see the module docstring."""
    from sglang.srt.managers.io_struct import GenerateReqInput

    options = current_options()
    if not options.enabled or not isinstance(obj, GenerateReqInput):
        return await original(manager, obj)
    decided = _decide(manager, obj, options)
    tokenized = await original(manager, obj)
    if decided is not None:
        layout, envelope = decided
        # SGLang may have truncated input_ids (--allow-auto-truncate): check the final ids, and
        # bind the layout to them (the scheduler uses it for exactly this prompt only). A missed
        # chunk is computed after the sink and the context: all of it within the model's
        # positions (issue 25 G10).
        spans = validate_spans(layout.spans, len(tokenized.input_ids),
                               max_chunk_len=manager.context_len - len(layout.prefix_ids),
                               min_chunk_len=options.min_chunk_tokens,
                               max_chunks=options.max_chunks)
        layout = dataclasses.replace(layout, spans=spans).for_prompt(tokenized.input_ids)
        tokenized.kv_hints = envelope_with(envelope, layout, obj.rid)
    return tokenized


def _decide(manager: Any, obj: GenerateReqInput, options: ServerOptions,
            ) -> tuple[ChunkLayout, KvHintsEnvelope | None] | None:
    """Tokenize a chunked request in place (``input_ids``, ``text``, ``extra_key``).

    Returns its layout (spans not yet checked against SGLang's final ids) and the client's
    envelope, or None for a request without chunks, after refusing what only the server may
    set.
    """
    if is_blend_extra_key(obj.extra_key):
        raise ValueError(f"extra_key must not start with {BLEND_KEY_PREFIX!r} (reserved)")
    envelope = decode_envelope(obj.kv_hints)
    triples = _triples(envelope)
    if any(kind == SERVER_ACTION for kind, _, _ in triples):
        raise ValueError(f"kv_hints action type {SERVER_ACTION!r} is reserved for the server")
    client = read_client_action(triples)
    marked = isinstance(obj.text, str) and contains_markers(obj.text)
    if client is None and not marked:
        return None
    if obj.input_embeds is not None:
        raise ValueError("CacheBlend chunks need text or input_ids, not input_embeds")
    if getattr(obj, "positional_embed_overrides", None) is not None:
        # Chunk KV is keyed by token ids alone: KV of overridden embeddings would be filed
        # under the plain tokens' key and served to requests without them (issue 25 G12).
        raise ValueError("CacheBlend chunks cannot be combined with positional_embed_overrides")
    tokenizer = ChunkTokenizer(manager.tokenizer)
    limit = manager.context_len
    sink = tokenizer.sink()
    context, family = _chunk_context(manager, client, options, tokenizer)
    if marked:
        if client is not None and not client.precompute:
            raise ValueError(
                "mark chunks either in the text or with a cacheblend.chunks action, not both"
            )
        segments = split_chunks(obj.text)
        max_new_tokens = (obj.sampling_params or {}).get("max_new_tokens")
        precompute = client is not None or (max_new_tokens == 0 and _is_one_chunk(segments))
        if precompute and not _is_one_chunk(segments):
            raise ValueError("a precompute request holds exactly one chunk and no other text")
        if precompute:
            prompt = precompute_prompt(tokenizer.plain(segments[0].text), (*sink, *context),
                                       max_chunk_len=limit - len(sink) - len(context))
        else:
            prefix, suffix = special_affixes(tokenizer.default, tokenizer.plain)
            prompt = tokenize_segments(
                segments, tokenizer.plain, prefix_ids=prefix, suffix_ids=suffix,
                max_chunk_len=limit - len(sink) - len(context))
        obj.input_ids, obj.text = list(prompt.input_ids), strip_markers(segments)
        spans = prompt.spans
    elif client.precompute:
        chunk_ids = list(obj.input_ids) if obj.input_ids is not None else tokenizer.plain(obj.text)
        prompt = precompute_prompt(chunk_ids, (*sink, *context),
                                   max_chunk_len=limit - len(sink) - len(context))
        obj.input_ids = list(prompt.input_ids)
        precompute, spans = True, prompt.spans
    else:
        precompute, spans = False, client.spans
    blend = None if precompute else _blend_settings(manager, obj, client, options, context,
                                                    family)
    policy = "fixed" if precompute else effective_ratio_policy(options.ratio_policy, client)
    return ChunkLayout(precompute, spans, sink, blend, policy, context, family), envelope


def _chunk_context(manager: Any, client: ClientAction | None, options: ServerOptions,
                   tokenizer: ChunkTokenizer) -> tuple[tuple[int, ...], str]:
    """The ids the request's chunk KV is computed after (beside the sink), and its context
    family ("" for none): a family's precompute brings its own ids, a family's blended request
    none (its chunks were computed by their precomputes); otherwise the server's context,
    unless the request asks for standalone chunk KV."""
    if client is not None and client.context_family is not None:
        ids = client.context_ids or ()
        vocab = getattr(manager.model_config, "vocab_size", None)
        if vocab is not None and any(t >= vocab for t in ids):
            raise ValueError(f"context_ids hold ids outside the model's vocabulary ({vocab})")
        if len(ids) >= manager.context_len:
            raise ValueError(f"context_ids hold {len(ids)} ids: no room for the sink and a "
                             f"chunk within the model's context_len of {manager.context_len}")
        return tuple(ids), client.context_family
    if client is not None and client.chunk_context == "none":
        return (), ""
    return tokenizer.context(options.chunk_context), ""


def _blend_settings(manager: Any, obj: GenerateReqInput, client: ClientAction | None,
                    options: ServerOptions, context: tuple[int, ...], family: str = ""):
    """The request's effective settings, checked against the model; puts the request into its
    settings' prefix namespace (:mod:`.blend_namespace`): blended KV is shared as a prefix only
    among requests blended the same way."""
    config = effective_config(options.blend, client)
    config.check_fits_model(manager.model_config.num_hidden_layers,
                            what="kv_hints cacheblend.chunks gradual/check layer")
    policy = effective_ratio_policy(options.ratio_policy, client)
    obj.extra_key = blend_extra_key(obj.extra_key, config, controller=policy == "controller",
                                    chunk_context=context, family=family)
    return config


def _is_one_chunk(segments: tuple[Segment, ...]) -> bool:
    return len(segments) == 1 and segments[0].is_chunk


def keep_sequential_tokenization(
    original: Callable[..., bool], manager: Any, batch_size: int, requests: Any
) -> bool:
    """AROUND ``TokenizerManager._should_use_batch_tokenization``: chunked batches go one by one.

    Batch encoding (``--enable-tokenizer-batch-encode``) tokenizes texts without
    ``_tokenize_one_request``, so it would never see the markers.
    """
    if not current_options().enabled:
        return original(manager, batch_size, requests)
    texts = getattr(requests, "text", None)
    hints = getattr(requests, "kv_hints", None)
    hints = hints if isinstance(hints, list) else [hints]
    if contains_markers(texts) or any(_has_cacheblend_action(h) for h in hints):
        return False
    return original(manager, batch_size, requests)


def decode_envelope(kv_hints: Any) -> KvHintsEnvelope | None:
    """SGLang's typed envelope for a request's ``kv_hints`` (dict or struct), or None."""
    return decode_kv_hints_envelope(kv_hints) if kv_hints else None


def _triples(envelope: KvHintsEnvelope | None) -> list[tuple[str, str, Any]]:
    if envelope is None:
        return []
    return [(a.action_type, a.action_version, a.payload) for a in envelope.actions]


def _has_cacheblend_action(kv_hints: Any) -> bool:
    try:
        envelope = decode_envelope(kv_hints)
    except ValueError:
        return True  # malformed: the per-request path reports it
    reserved = (*ACTION_TYPES, SERVER_ACTION)
    return any(kind in reserved for kind, _, _ in _triples(envelope))
