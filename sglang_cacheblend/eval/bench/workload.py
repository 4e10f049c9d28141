"""The prompts ``sglang-cacheblend bench`` sends: one RAG prompt per (chunks, size) shape.

A chunk of ``size`` tokens is cut from consecutive musique passages (the item's, then the next
items'), joined by a space when one passage is shorter than ``size``; with ``size`` None the
chunks are the item's first passages as they are (the prompt ``eval`` and the demo send). Every
prompt is the shared RAG prompt of :mod:`sglang_cacheblend.dataset`, tokenized piece by piece,
in file order and with its chunks reversed (what defeats SGLang's prefix cache).
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from sglang_cacheblend.chunks import ChunkedPrompt, Encode
from sglang_cacheblend.dataset import (
    QAItem,
    RagPrompt,
    build_prompt,
    encoder,
    rag_prompt,
    tokenize_prompt,
)

Decode = Callable[[Sequence[int]], str]
"""``token ids -> text``: how :func:`sized_passages` turns a token cut back into a chunk text."""


def sized_passages(
    items: Sequence[QAItem], start: int, count: int, size: int, encode: Encode, decode: Decode
) -> list[str]:
    """``count`` chunk texts of ``size`` tokens each, cut from consecutive passages.

    Passages are taken from ``items[start]``, then the following items (wrapping around); a
    passage shorter than ``size`` is joined with the next by a space. Each chunk text is the
    decoded first ``size`` tokens, so it re-tokenizes to about ``size`` tokens.
    """
    if count < 1 or size < 1:
        raise ValueError(f"count and size must be >= 1, got {count} and {size}")
    stream = (p for i in range(len(items)) for p in items[(start + i) % len(items)].passages)
    chunks: list[str] = []
    for _ in range(count):
        ids: list[int] = []
        while len(ids) < size:
            passage = next(stream, None)
            if passage is None:
                raise ValueError(f"the data holds too few passages for {count} x {size} tokens")
            ids += encode(passage if not ids else " " + passage)
        chunks.append(decode(ids[:size]))
    return chunks


def reorderings(n: int, count: int, seed: int) -> list[list[int]]:
    """``count`` seeded random orders of ``n`` chunks, none the original order (n >= 2)."""
    if n < 2:
        raise ValueError("reordering needs at least 2 chunks")
    rng = random.Random(seed)
    orders: list[list[int]] = []
    while len(orders) < count:
        order = rng.sample(range(n), n)
        if order != list(range(n)):
            orders.append(order)
    return orders


def shape_label(chunks: int, chunk_size: int | None) -> str:
    """``"6 x 512"``, or ``"6 passages"`` for the item's passages as they are."""
    return f"{chunks} passages" if chunk_size is None else f"{chunks} x {chunk_size}"


@dataclass(frozen=True)
class Workload:
    """One (chunks, size) prompt shape: its pieces and the two fixed orders TTFT sends.

    ``chunk_size`` None: the chunks are the item's first ``chunks`` passages, uncut.
    """

    chunks: int
    chunk_size: int | None
    prompt: RagPrompt
    ordered: ChunkedPrompt
    reordered: ChunkedPrompt  # passages reversed

    @property
    def prompt_tokens(self) -> int:
        """Prompt length in tokens (the same in either order), what the context limit applies to."""
        return len(self.ordered.input_ids)


def make_workload(
    items: Sequence[QAItem], item: int, chunks: int, size: int | None, tokenizer: Any
) -> Workload:
    """The prompt of ``chunks`` chunks of ``size`` tokens (None: the item's own passages, uncut)
    and the question of ``items[item]``."""
    encode = encoder(tokenizer)

    def decode(ids: Sequence[int]) -> str:
        return tokenizer.decode(ids, clean_up_tokenization_spaces=False)

    if size is None:
        prompt = build_prompt(items[item], num_passages=chunks)
    else:
        prompt = rag_prompt(sized_passages(items, item, chunks, size, encode, decode),
                            items[item].question)
    reverse = prompt.reordered(list(range(chunks))[::-1])
    return Workload(chunks, size, prompt, tokenize_prompt(prompt, encode),
                    tokenize_prompt(reverse, encode))
