"""Chunk markers in ``/v1/chat/completions`` messages.

SGLang's chat path renders the chat template and tokenizes in one step, which would tokenize the
markers as text. With markers in the messages, :func:`render_chat_with_markers` returns the
rendered template *text* (markers in place) instead, and :func:`convert_chat_with_chunks`
tokenizes it segment by segment without adding special tokens (the template already has them);
the spans then travel as an explicit ``cacheblend.chunks`` action to the tokenizer hook
(:mod:`.tokenizer_hooks`), which validates them like any other. The OpenAI protocol has no
``kv_hints``, so this is the only way chunks reach the chat endpoint.

Both hooks do nothing unless the server runs with ``--enable-cacheblend``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from sglang_cacheblend.chunks import chunk_hints, contains_markers, split_chunks, tokenize_segments
from sglang_cacheblend.options import current_options
from sglang_cacheblend.srt.tokenizer_hooks import ChunkTokenizer

__all__ = ["convert_chat_with_chunks", "render_chat_with_markers"]


def render_chat_with_markers(
    original: Callable[..., Any], serving: Any, messages: list[dict[str, Any]], **kwargs: Any
) -> tuple[Any, str | None]:
    """AROUND ``OpenAIServingChat._render_and_encode_chat_template``.

    With chunk markers in the messages, return the rendered template *text* (markers in place)
    instead of token ids; SGLang then carries it as ``GenerateReqInput.text``, and
    :func:`convert_chat_with_chunks` tokenizes it segment by segment.
    """
    if not current_options().enabled or not contains_markers(messages):
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
    if not current_options().enabled:
        return original(serving, request, *args, **kwargs)
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
    tokenizer = ChunkTokenizer(serving.tokenizer_manager.tokenizer)
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
