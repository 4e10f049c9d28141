"""Chunk spans over a prompt's token ids: one shape, ``[start, end)``, checked in one place.

A span is a half-open pair of token offsets. It keeps this shape from the client
(``chunk_hints``) through the tokenizer process to the scheduler and the model, so no layer
converts it. Pure Python.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

__all__ = ["ChunkedPrompt", "Span", "check_chunk_len", "validate_spans"]

Span = tuple[int, int]


def validate_spans(
    spans: Any,
    num_tokens: int,
    *,
    max_chunk_len: int | None = None,
    min_chunk_len: int = 1,
    max_chunks: int | None = None,
) -> tuple[Span, ...]:
    """Check chunk spans over a prompt of ``num_tokens`` tokens and return them as int pairs.

    Spans must be ``[start, end)`` pairs of ints, non-empty, inside the prompt, sorted and
    disjoint, between ``min_chunk_len`` and ``max_chunk_len`` long, and at most ``max_chunks``
    of them (each chunk that misses costs a standalone forward in the scheduler, so a server
    bounds both); otherwise ``ValueError`` names the span.
    """
    if not isinstance(spans, (list, tuple)):
        raise ValueError(f"chunk spans must be a list of [start, end] pairs, got {spans!r}")
    if max_chunks is not None and len(spans) > max_chunks:
        raise ValueError(f"{len(spans)} chunks in one request, more than this server's limit "
                         f"of {max_chunks}")
    checked: list[Span] = []
    for i, span in enumerate(spans):
        if (
            not isinstance(span, (list, tuple))
            or len(span) != 2
            or not all(isinstance(x, int) and not isinstance(x, bool) for x in span)
        ):
            raise ValueError(f"chunk span {i} must be a [start, end] pair of ints, got {span!r}")
        start, end = span
        if start >= end:
            raise ValueError(f"chunk span {i} [{start}, {end}) is empty")
        if start < 0 or end > num_tokens:
            raise ValueError(
                f"chunk span {i} [{start}, {end}) is outside the prompt of {num_tokens} tokens"
            )
        if checked and start < checked[-1][1]:
            prev = checked[-1]
            raise ValueError(
                f"chunk spans must be sorted and must not overlap: span {i} [{start}, {end}) "
                f"starts before span {i - 1} [{prev[0]}, {prev[1]}) ends"
            )
        check_chunk_len(i, end - start, max_chunk_len)
        checked.append((start, end))
    for i, (start, end) in enumerate(checked):  # after the shape checks, which say more
        if end - start < min_chunk_len:
            raise ValueError(f"chunk span {i} [{start}, {end}) has {end - start} tokens, fewer "
                             f"than this server's minimum of {min_chunk_len}")
    return tuple(checked)


def check_chunk_len(index: int, length: int, max_chunk_len: int | None) -> None:
    """``ValueError`` naming chunk ``index`` if it is empty or longer than ``max_chunk_len``."""
    if length == 0:
        raise ValueError(f"chunk {index} is empty after tokenization")
    if max_chunk_len is not None and length > max_chunk_len:
        raise ValueError(
            f"chunk {index} has {length} tokens, more than the limit of {max_chunk_len}"
        )


@dataclass(frozen=True)
class ChunkedPrompt:
    """Token ids of a prompt and the ``[start, end)`` spans of its chunks (sorted, disjoint)."""

    input_ids: tuple[int, ...]
    spans: tuple[Span, ...]

    def __post_init__(self) -> None:
        validate_spans(self.spans, len(self.input_ids))
