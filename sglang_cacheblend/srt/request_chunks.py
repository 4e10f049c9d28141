"""Chunk marking inside SGLang: from a request's markers or ``kv_hints`` to ``Req.kv_hints``.

Frontend processes (hook bodies, registered in ``hooks.py``):

- ``tokenize_with_chunks`` wraps ``TokenizerManager._tokenize_one_request``. A request with chunk
  markers in its text, or with a CacheBlend ``kv_hints`` action, is tokenized here: every chunk on
  its own (:mod:`sglang_cacheblend.chunks`), the tokenizer's own special tokens around the whole
  prompt. The client's CacheBlend action is replaced by a validated one carrying the spans and
  the KV variant; SGLang then carries it unchanged to ``Req.kv_hints`` in the scheduler.
  Bad markers or spans raise ``ValueError``, which SGLang's HTTP layer answers with 400.
- ``render_chat_with_markers`` and ``convert_chat_with_chunks`` do the same for
  ``/v1/chat/completions``: the chat template is rendered to text with the markers in place,
  then the marked text is tokenized segment by segment without adding special tokens (the
  template already has them), and the spans travel as an explicit ``cacheblend.chunks`` action.

Scheduler processes: :func:`chunk_action_of` reads the validated action back from a ``Req``.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from sglang.srt.managers.kv_hints import KvHintAction, KvHintsEnvelope, decode_kv_hints_envelope

from sglang_cacheblend.chunks import (
    ACTION_TYPES,
    ACTION_VERSION,
    ChunkAction,
    ChunkedPrompt,
    Segment,
    chunk_hints,
    contains_markers,
    precompute_prompt,
    read_chunk_action,
    sink_ids,
    sink_variant,
    special_affixes,
    split_chunks,
    strip_markers,
    tokenize_segments,
    validate_spans,
)
from sglang_cacheblend.srt.blend_keys import (
    BLEND_KEY_PREFIX,
    blend_extra_key,
    effective_config,
    is_blend_extra_key,
)
from sglang_cacheblend.srt.options import ServerOptions

if TYPE_CHECKING:
    from sglang.srt.managers.io_struct import GenerateReqInput
    from sglang.srt.managers.schedule_batch import Req

logger = logging.getLogger(__name__)


# ------------------------------------------------------------------------------ scheduler side


def chunk_action_of(req: Req) -> ChunkAction | None:
    """The server-written CacheBlend action of a scheduler ``Req``, or None.

    Never raises (the scheduler must keep serving): an action that does not fit the prompt can
    only come from a path around the tokenizer hook; it is logged and ignored.
    """
    envelope = getattr(req, "kv_hints", None)
    if envelope is None:
        return None
    try:
        action = read_chunk_action(_triples(envelope), normalized=True)
        if action is not None:
            validate_spans(action.spans, len(req.origin_input_ids))
        return action
    except ValueError as exc:
        logger.error("request %s: ignoring its CacheBlend action: %s", req.rid, exc)
        return None


# ------------------------------------------------------------------------------ tokenizer manager


class _Tokenizer:
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


async def tokenize_with_chunks(original: Callable[..., Any], manager: Any, obj: Any) -> Any:
    """AROUND ``TokenizerManager._tokenize_one_request``: see the module docstring."""
    from sglang.srt.managers.io_struct import GenerateReqInput

    if not isinstance(obj, GenerateReqInput):
        return await original(manager, obj)
    post_check = _prepare_request(manager, obj)
    tokenized = await original(manager, obj)
    if post_check is not None:
        validate_spans(
            post_check.spans, len(tokenized.input_ids), max_chunk_len=manager.context_len
        )
    return tokenized


def _prepare_request(manager: Any, obj: GenerateReqInput) -> ChunkAction | None:
    """Tokenize a chunked request in place (``input_ids``, ``text``, ``kv_hints``).

    Returns the action whose spans can only be checked after SGLang tokenized the text (explicit
    spans over a text prompt), else None.
    """
    envelope = _decode(obj.kv_hints)
    client = read_chunk_action(_triples(envelope), normalized=False)
    marked = isinstance(obj.text, str) and contains_markers(obj.text)
    if client is None and not marked:
        return None
    if obj.input_embeds is not None:
        raise ValueError("CacheBlend chunks need text or input_ids, not input_embeds")
    tokenizer = _Tokenizer(manager.tokenizer)
    limit = manager.context_len
    sink = tokenizer.sink()
    variant = sink_variant(sink)
    post_check = None
    if marked:
        if client is not None and not client.precompute:
            raise ValueError(
                "mark chunks either in the text or with a cacheblend.chunks action, not both"
            )
        segments = split_chunks(obj.text)
        max_new_tokens = (obj.sampling_params or {}).get("max_new_tokens")
        precompute = client is not None or (max_new_tokens == 0 and _is_one_chunk(segments))
        if precompute:
            if not _is_one_chunk(segments):
                raise ValueError("a precompute request holds exactly one chunk and no other text")
            prompt = precompute_prompt(tokenizer.plain(segments[0].text), sink, max_chunk_len=limit)
        else:
            prefix, suffix = special_affixes(tokenizer.default, tokenizer.plain)
            prompt = tokenize_segments(
                segments, tokenizer.plain, prefix_ids=prefix, suffix_ids=suffix, max_chunk_len=limit
            )
        action = ChunkAction(precompute, prompt.spans, variant)
        _set_prompt(obj, prompt, strip_markers(segments))
    elif client.precompute:
        chunk_ids = list(obj.input_ids) if obj.input_ids is not None else tokenizer.plain(obj.text)
        prompt = precompute_prompt(chunk_ids, sink, max_chunk_len=limit)
        action = ChunkAction(True, prompt.spans, variant)
        _set_prompt(obj, prompt, obj.text)
    else:
        action = dataclasses.replace(client, variant=variant)
        if obj.input_ids is not None:
            validate_spans(client.spans, len(obj.input_ids), max_chunk_len=limit)
        else:
            post_check = action
    obj.kv_hints = _with_action(envelope, action, obj.rid)
    _use_blend_namespace(obj, action)
    return post_check


def _use_blend_namespace(obj: GenerateReqInput, action: ChunkAction) -> None:
    """Put a request that asks for blending into its blend settings' prefix namespace.

    See :mod:`sglang_cacheblend.srt.blend_keys`: blended KV is shared as a prefix only among
    requests blended the same way (a follow-up turn reuses the previous turn's KV this way).
    """
    server = _server_options()
    if action.precompute or not server.enabled:
        return
    if is_blend_extra_key(obj.extra_key):
        raise ValueError(f"extra_key must not start with {BLEND_KEY_PREFIX!r} (reserved)")
    obj.extra_key = blend_extra_key(obj.extra_key, effective_config(server.blend, action))


@functools.cache
def _server_options() -> ServerOptions:
    """The launch options (the tokenizer manager runs in the launcher, which set the env)."""
    return ServerOptions.from_env()


def _is_one_chunk(segments: tuple[Segment, ...]) -> bool:
    return len(segments) == 1 and segments[0].is_chunk


def _set_prompt(obj: GenerateReqInput, prompt: ChunkedPrompt, text: str | None) -> None:
    obj.input_ids = list(prompt.input_ids)
    obj.text = text


def keep_sequential_tokenization(
    original: Callable[..., bool], manager: Any, batch_size: int, requests: Any
) -> bool:
    """AROUND ``TokenizerManager._should_use_batch_tokenization``: chunked batches go one by one.

    Batch encoding (``--enable-tokenizer-batch-encode``) tokenizes texts without
    ``_tokenize_one_request``, so it would never see the markers.
    """
    texts = getattr(requests, "text", None)
    hints = getattr(requests, "kv_hints", None)
    hints = hints if isinstance(hints, list) else [hints]
    if contains_markers(texts) or any(_has_our_action(_decode(h)) for h in hints):
        return False
    return original(manager, batch_size, requests)


# ------------------------------------------------------------------------------ OpenAI chat


def render_chat_with_markers(
    original: Callable[..., Any], serving: Any, messages: list[dict[str, Any]], **kwargs: Any
) -> tuple[Any, str | None]:
    """AROUND ``OpenAIServingChat._render_and_encode_chat_template``.

    With chunk markers in the messages, return the rendered template *text* (markers in place)
    instead of token ids; SGLang then carries it as ``GenerateReqInput.text``, and
    :func:`convert_chat_with_chunks` tokenizes it segment by segment.
    """
    if not contains_markers(messages):
        return original(serving, messages, **kwargs)
    if serving._prompt_text_round_trip_is_lossy or (
        serving.template_manager.python_chat_template is not None
    ):
        raise ValueError("chunk markers need a Jinja chat template that renders to plain text")
    text = serving.tokenizer_manager.tokenizer.apply_chat_template(
        messages,
        tokenize=False,
        add_generation_prompt=kwargs.get("add_generation_prompt", True),
        tools=kwargs.get("tools"),
        return_dict=False,
        **kwargs.get("template_kwargs", {}),
    )
    return text, None


def convert_chat_with_chunks(
    original: Callable[..., Any], serving: Any, request: Any, *args: Any, **kwargs: Any
) -> tuple[Any, Any]:
    """AROUND ``OpenAIServingChat._convert_to_internal_request``: marked text -> ids + spans."""
    messages = [message.model_dump() for message in request.messages]
    marked = contains_markers(messages)
    if marked:
        _check_message_markers(messages)
    if marked and request.continue_final_message:
        raise ValueError("chunk markers cannot be combined with continue_final_message")
    adapted, processed = original(serving, request, *args, **kwargs)
    if not marked:
        return adapted, processed
    if not (isinstance(adapted.text, str) and contains_markers(adapted.text)):
        raise ValueError("chunk markers need the model's Jinja chat template (not --chat-template)")
    tokenizer = _Tokenizer(serving.tokenizer_manager.tokenizer)
    prompt = tokenize_segments(
        split_chunks(adapted.text),
        tokenizer.plain,
        max_chunk_len=serving.tokenizer_manager.context_len,
    )
    adapted.input_ids = list(prompt.input_ids)
    adapted.text = None
    adapted.kv_hints = chunk_hints(prompt.spans, message_id=str(adapted.rid or "cacheblend"))
    return adapted, processed


def _check_message_markers(messages: list[dict[str, Any]]) -> None:
    """Check the markers of every message on its own, so an error names the message.

    A chunk cannot span messages: it would take the template's tokens between them.
    """
    for i, message in enumerate(messages):
        content = message.get("content")
        parts = content if isinstance(content, list) else [content]
        for part in parts:
            text = part.get("text") if isinstance(part, dict) else part
            if isinstance(text, str):
                try:
                    split_chunks(text)
                except ValueError as exc:
                    raise ValueError(f"messages[{i}]: {exc}") from exc


# ------------------------------------------------------------------------------ envelopes


def _decode(kv_hints: Any) -> KvHintsEnvelope | None:
    return decode_kv_hints_envelope(kv_hints) if kv_hints else None


def _triples(envelope: KvHintsEnvelope | None) -> list[tuple[str, str, Any]]:
    if envelope is None:
        return []
    return [(a.action_type, a.action_version, a.payload) for a in envelope.actions]


def _has_our_action(envelope: KvHintsEnvelope | None) -> bool:
    return any(kind in ACTION_TYPES for kind, _, _ in _triples(envelope))


def _with_action(
    envelope: KvHintsEnvelope | None, action: ChunkAction, rid: Any
) -> KvHintsEnvelope:
    """``envelope`` with its CacheBlend action replaced by ``action`` (other actions kept)."""
    ours = KvHintAction(
        action_id=action.action_type,
        action_type=action.action_type,
        action_version=ACTION_VERSION,
        payload=action.payload(),
    )
    if envelope is None:
        return KvHintsEnvelope(protocol_version="1", message_id=str(rid), actions=[ours])
    others = [a for a in envelope.actions if a.action_type not in ACTION_TYPES]
    return KvHintsEnvelope(
        protocol_version=envelope.protocol_version,
        message_id=envelope.message_id,
        actions=[*others, ours],
    )
