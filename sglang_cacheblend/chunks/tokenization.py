"""Turning a marked prompt into token ids with known chunk spans.

Each chunk is tokenized **on its own**, so its token ids never depend on its neighbours and the
same passage hits the same cached KV wherever it sits; the prompt becomes ``prefix + chunk_1 +
... + chunk_k + suffix``. Pure Python: the tokenizer comes in as an ``encode`` function.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from sglang_cacheblend.chunks.markers import Segment
from sglang_cacheblend.chunks.spans import ChunkedPrompt, Span, check_chunk_len

__all__ = [
    "SINK_FALLBACK_TEXT", "Encode", "precompute_prompt", "sink_ids", "sink_variant",
    "special_affixes", "tokenize_segments",
]

Encode = Callable[[str], Sequence[int]]

SINK_FALLBACK_TEXT = "\n"
"""Attention sink for tokenizers without a BOS token (the BOS token is the sink otherwise)."""


def tokenize_segments(
    segments: Sequence[Segment],
    encode: Encode,
    *,
    prefix_ids: Sequence[int] = (),
    suffix_ids: Sequence[int] = (),
    max_chunk_len: int | None = None,
) -> ChunkedPrompt:
    """Tokenize every segment on its own and join them.

    ``encode`` must add no special tokens; ``prefix_ids``/``suffix_ids`` are the special tokens the
    tokenizer adds around a whole prompt (see :func:`special_affixes`), or none when the text
    already has them (a rendered chat template).
    """
    input_ids = list(prefix_ids)
    spans: list[Span] = []
    for segment in segments:
        ids = list(encode(segment.text))
        if segment.is_chunk:
            check_chunk_len(len(spans), len(ids), max_chunk_len)
            spans.append((len(input_ids), len(input_ids) + len(ids)))
        input_ids.extend(ids)
    input_ids.extend(suffix_ids)
    return ChunkedPrompt(tuple(input_ids), tuple(spans))


def precompute_prompt(
    chunk_ids: Sequence[int], sink: Sequence[int], *, max_chunk_len: int | None = None
) -> ChunkedPrompt:
    """The prompt that computes one chunk standalone: ``sink + chunk``, the chunk as its span."""
    check_chunk_len(0, len(chunk_ids), max_chunk_len)
    input_ids = (*sink, *chunk_ids)
    return ChunkedPrompt(tuple(input_ids), ((len(sink), len(input_ids)),))


def special_affixes(
    encode_default: Encode, encode_plain: Encode, probe: str = "a"
) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """The special tokens a tokenizer adds before and after a prompt (e.g. ``([BOS], ())``).

    ``encode_default`` tokenizes as SGLang does for ``/generate`` text, ``encode_plain`` without
    special tokens.
    """
    full, bare = list(encode_default(probe)), list(encode_plain(probe))
    for i in range(len(full) - len(bare) + 1):
        if full[i : i + len(bare)] == bare:
            return tuple(full[:i]), tuple(full[i + len(bare) :])
    raise ValueError("cannot tell which special tokens the tokenizer adds around a prompt")


def sink_ids(bos_token_id: int | None, encode_plain: Encode) -> tuple[int, ...]:
    """The fixed attention-sink prefix a chunk is precomputed after: BOS, else a newline."""
    if bos_token_id is not None:
        return (int(bos_token_id),)
    ids = tuple(encode_plain(SINK_FALLBACK_TEXT))
    if not ids:
        raise ValueError("the tokenizer has no BOS token and encodes the fallback sink to nothing")
    return ids


def sink_variant(sink: Sequence[int]) -> str:
    """Chunk-namespace variant of KV computed standalone after ``sink`` (which is dropped).

    KV computed after another sink is different KV, so the sink is part of the chunk's key.
    """
    if not sink:
        raise ValueError("a standalone chunk needs a sink of at least one token")
    return "standalone-after:" + ",".join(str(int(token)) for token in sink)
