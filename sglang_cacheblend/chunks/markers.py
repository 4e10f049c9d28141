"""Chunk markers in prompt text: how a client says "this passage is a reusable chunk".

``chunk(text)`` wraps a passage in :data:`CHUNK_OPEN` / :data:`CHUNK_CLOSE`; the server splits on
them (``/generate`` text, ``sgl.function`` programs, chat messages). Markers are plain strings,
so they work anywhere a prompt string goes and need no new protocol field. Pure Python.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

__all__ = [
    "CHUNK_CLOSE", "CHUNK_OPEN", "Segment", "chunk", "contains_markers", "split_chunks",
    "strip_markers",
]

CHUNK_OPEN = "<|cacheblend_chunk|>"
CHUNK_CLOSE = "<|/cacheblend_chunk|>"


def chunk(text: str) -> str:
    """Mark ``text`` as a reusable chunk: ``s += cb.chunk(passage)`` in an ``sgl.function``.

    Returns the text wrapped in the chunk markers; works anywhere a prompt string goes
    (``/generate`` text, chat message content).
    """
    if not isinstance(text, str):
        raise ValueError(f"a chunk must be a str, got {type(text).__name__}")
    if not text.strip():
        raise ValueError("a chunk must not be empty")
    if CHUNK_OPEN in text or CHUNK_CLOSE in text:
        raise ValueError("a chunk must not contain the chunk markers itself")
    return f"{CHUNK_OPEN}{text}{CHUNK_CLOSE}"


@dataclass(frozen=True)
class Segment:
    """A piece of a marked prompt: plain text, or the text of one chunk (markers removed)."""

    text: str
    is_chunk: bool


def contains_markers(value: Any) -> bool:
    """Whether a string, or any string inside nested lists/dicts, holds a chunk marker."""
    if isinstance(value, str):
        return CHUNK_OPEN in value or CHUNK_CLOSE in value
    if isinstance(value, Mapping):
        return any(contains_markers(v) for v in value.values())
    if isinstance(value, (list, tuple)):
        return any(contains_markers(v) for v in value)
    return False


def split_chunks(text: str) -> tuple[Segment, ...]:
    """Split ``text`` on the chunk markers; empty plain segments are dropped.

    Raises ``ValueError`` naming the character offset for a nested, unopened or unclosed marker
    and for an empty (or whitespace-only) chunk.
    """
    segments: list[Segment] = []
    pos = 0
    count = 0
    while True:
        start = text.find(CHUNK_OPEN, pos)
        stray_close = text.find(CHUNK_CLOSE, pos)
        if stray_close != -1 and (start == -1 or stray_close < start):
            raise ValueError(
                f"chunk end marker at character {stray_close} has no matching start marker"
            )
        if start == -1:
            break
        body_start = start + len(CHUNK_OPEN)
        end = text.find(CHUNK_CLOSE, body_start)
        nested = text.find(CHUNK_OPEN, body_start)
        if end == -1:
            raise ValueError(f"chunk start marker at character {start} is never closed")
        if nested != -1 and nested < end:
            raise ValueError(
                f"chunk start marker at character {nested} is nested inside the chunk opened at "
                f"character {start}; chunks cannot nest"
            )
        body = text[body_start:end]
        if not body.strip():
            raise ValueError(f"chunk {count} (at character {start}) is empty")
        if start > pos:
            segments.append(Segment(text[pos:start], False))
        segments.append(Segment(body, True))
        count += 1
        pos = end + len(CHUNK_CLOSE)
    if pos < len(text):
        segments.append(Segment(text[pos:], False))
    return tuple(segments)


def strip_markers(segments: Iterable[Segment]) -> str:
    """The prompt text without markers (what SGLang keeps as the request's text)."""
    return "".join(segment.text for segment in segments)
