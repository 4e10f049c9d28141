"""Marking reusable chunks in a prompt: markers, spans and the ``kv_hints`` actions that carry them.

Pure Python: no SGLang, no torch. Shared by clients (``cb.chunk``, ``precompute_chunks``) and by
the server glue (``sglang_cacheblend.srt.request_chunks``), so both sides read one definition.

A chunk is tokenized **on its own**, so its token ids never depend on its neighbours; the prompt
becomes ``prefix + chunk_1 + ... + chunk_k + suffix`` with known ``[start, end)`` spans over the
prompt's token ids. Three ways to mark chunks, one meaning:

- text markers: ``chunk(text)`` wraps a passage in :data:`CHUNK_OPEN` / :data:`CHUNK_CLOSE`;
  the server splits on them (``/generate`` text, ``sgl.function`` programs, chat messages);
- explicit spans over ``input_ids``: a ``kv_hints`` action :data:`ACTION_CHUNKS`;
- a precompute request (:data:`ACTION_PRECOMPUTE`, or ``max_new_tokens: 0`` whose text is exactly
  one marked chunk) computes one chunk standalone for the chunk index.

Server-normalized actions (what the scheduler reads) always carry ``spans`` and ``variant``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

CHUNK_OPEN = "<|cacheblend_chunk|>"
CHUNK_CLOSE = "<|/cacheblend_chunk|>"

ACTION_CHUNKS = "cacheblend.chunks"
ACTION_PRECOMPUTE = "cacheblend.precompute"
ACTION_VERSION = "1"
ACTION_TYPES = (ACTION_CHUNKS, ACTION_PRECOMPUTE)

SINK_FALLBACK_TEXT = "\n"
"""Attention sink for tokenizers without a BOS token (the BOS token is the sink otherwise)."""

Span = tuple[int, int]
Encode = Callable[[str], Sequence[int]]


# ------------------------------------------------------------------------------ client side


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


def chunk_hints(
    spans: Iterable[Span],
    *,
    recompute_ratio: float | None = None,
    selector: str | None = None,
    gradual: Sequence[tuple[int, float]] | None = None,
    message_id: str = "cacheblend",
) -> dict[str, Any]:
    """A ``kv_hints`` envelope marking ``[start, end)`` spans of ``input_ids`` as chunks.

    ``recompute_ratio``, ``selector`` and ``gradual`` (``[(layer, ratio), ...]``) override the
    server's blend settings for this request only.
    """
    payload: dict[str, Any] = {"spans": [[int(s), int(e)] for s, e in spans]}
    overrides = {"recompute_ratio": recompute_ratio, "selector": selector,
                 "gradual": None if gradual is None else [[int(l), float(r)] for l, r in gradual]}
    payload.update({k: v for k, v in overrides.items() if v is not None})
    return _envelope(ACTION_CHUNKS, payload, message_id)


def precompute_hints(*, message_id: str = "cacheblend") -> dict[str, Any]:
    """A ``kv_hints`` envelope asking the server to compute the request's one chunk standalone."""
    return _envelope(ACTION_PRECOMPUTE, {}, message_id)


def precompute_chunks(
    base_url: str,
    texts: Sequence[str],
    *,
    cache_salt: str | None = None,
    extra_key: str | None = None,
    timeout: float = 600.0,
) -> list[dict[str, Any]]:
    """Compute each text standalone and store its KV in the server's chunk index.

    One batched ``/generate`` call with ``max_new_tokens: 0``; returns SGLang's outputs, one per
    text. ``cache_salt``/``extra_key`` must match those of the requests that will reuse them.
    """
    import requests

    if not texts:
        raise ValueError("precompute_chunks needs at least one text")
    body: dict[str, Any] = {
        "text": [chunk(text) for text in texts],
        "sampling_params": {"max_new_tokens": 0},
        "kv_hints": precompute_hints(),
    }
    for name, value in (("cache_salt", cache_salt), ("extra_key", extra_key)):
        if value is not None:
            body[name] = [value] * len(texts)
    response = requests.post(base_url.rstrip("/") + "/generate", json=body, timeout=timeout)
    if response.status_code != 200:
        raise ValueError(f"precompute failed ({response.status_code}): {response.text}")
    return response.json()


def _envelope(action_type: str, payload: dict[str, Any], message_id: str) -> dict[str, Any]:
    action = {
        "action_id": action_type,
        "action_type": action_type,
        "action_version": ACTION_VERSION,
        "payload": payload,
    }
    return {"protocol_version": "1", "message_id": message_id, "actions": [action]}


# ------------------------------------------------------------------------------ markers


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
    return "".join(segment.text for segment in segments)


# ------------------------------------------------------------------------------ token ids


@dataclass(frozen=True)
class ChunkedPrompt:
    """Token ids of a prompt and the ``[start, end)`` spans of its chunks (sorted, disjoint)."""

    input_ids: tuple[int, ...]
    spans: tuple[Span, ...]

    def __post_init__(self) -> None:
        validate_spans(self.spans, len(self.input_ids))


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
            _check_chunk_len(len(spans), len(ids), max_chunk_len)
            spans.append((len(input_ids), len(input_ids) + len(ids)))
        input_ids.extend(ids)
    input_ids.extend(suffix_ids)
    return ChunkedPrompt(tuple(input_ids), tuple(spans))


def precompute_prompt(
    chunk_ids: Sequence[int], sink: Sequence[int], *, max_chunk_len: int | None = None
) -> ChunkedPrompt:
    """The prompt that computes one chunk standalone: ``sink + chunk``, the chunk as its span."""
    _check_chunk_len(0, len(chunk_ids), max_chunk_len)
    input_ids = (*sink, *chunk_ids)
    return ChunkedPrompt(tuple(input_ids), ((len(sink), len(input_ids)),))


def validate_spans(
    spans: Any, num_tokens: int, *, max_chunk_len: int | None = None
) -> tuple[Span, ...]:
    """Check chunk spans over a prompt of ``num_tokens`` tokens and return them as int pairs.

    Spans must be ``[start, end)`` pairs of ints, non-empty, inside the prompt, sorted and
    disjoint, and at most ``max_chunk_len`` long; otherwise ``ValueError`` names the span.
    """
    if not isinstance(spans, (list, tuple)):
        raise ValueError(f"chunk spans must be a list of [start, end] pairs, got {spans!r}")
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
        _check_chunk_len(i, end - start, max_chunk_len)
        checked.append((start, end))
    return tuple(checked)


def _check_chunk_len(index: int, length: int, max_chunk_len: int | None) -> None:
    if length == 0:
        raise ValueError(f"chunk {index} is empty after tokenization")
    if max_chunk_len is not None and length > max_chunk_len:
        raise ValueError(
            f"chunk {index} has {length} tokens, more than the limit of {max_chunk_len}"
        )


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


_SINK_VARIANT_PREFIX = "standalone-after:"


def sink_variant(sink: Sequence[int]) -> str:
    """Chunk-namespace variant of KV computed standalone after ``sink`` (which is dropped)."""
    return _SINK_VARIANT_PREFIX + ",".join(str(token) for token in sink)


def variant_sink(variant: str) -> tuple[int, ...]:
    """The sink token ids a :func:`sink_variant` names (the scheduler has no tokenizer)."""
    if not variant.startswith(_SINK_VARIANT_PREFIX):
        raise ValueError(f"not a standalone-chunk variant: {variant!r}")
    body = variant.removeprefix(_SINK_VARIANT_PREFIX)
    try:
        sink = tuple(int(token) for token in body.split(","))
    except ValueError:
        raise ValueError(f"malformed standalone-chunk variant: {variant!r}") from None
    return sink


# ------------------------------------------------------------------------------ kv_hints actions


@dataclass(frozen=True)
class ChunkAction:
    """The CacheBlend action of one request.

    ``precompute``: the request computes its single chunk standalone (after the sink) for the
    chunk index; otherwise ``spans`` are chunks to look up. ``variant`` names how chunk KV is
    computed (set by the server; empty in a client's action).
    """

    precompute: bool
    spans: tuple[Span, ...]
    variant: str = ""
    # Per-request overrides of the server's blend settings (None: the server's).
    recompute_ratio: float | None = None
    selector: str | None = None
    gradual: tuple[tuple[int, float], ...] | None = None

    def __post_init__(self) -> None:
        validate_spans(self.spans, max((end for _, end in self.spans), default=0))
        if self.precompute and len(self.spans) > 1:
            raise ValueError(f"a precompute request holds one chunk, got {len(self.spans)}")
        ratio = self.recompute_ratio
        if ratio is not None and (
            isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not 0 <= ratio <= 1
        ):
            raise ValueError(f"recompute_ratio must be a number in [0, 1], got {ratio!r}")
        if self.selector is not None:
            from sglang_cacheblend.blend.registry import selector_names

            if self.selector not in selector_names():
                raise ValueError(f"selector must be one of {sorted(selector_names())}, "
                                 f"got {self.selector!r}")
        if self.gradual is not None:
            object.__setattr__(self, "gradual", _gradual_steps(self.gradual))

    @property
    def action_type(self) -> str:
        return ACTION_PRECOMPUTE if self.precompute else ACTION_CHUNKS

    def payload(self) -> dict[str, Any]:
        payload: dict[str, Any] = {
            "spans": [[start, end] for start, end in self.spans], "variant": self.variant
        }
        if self.recompute_ratio is not None:
            payload["recompute_ratio"] = self.recompute_ratio
        if self.selector is not None:
            payload["selector"] = self.selector
        if self.gradual is not None:
            payload["gradual"] = [list(step) for step in self.gradual]
        return payload


def _gradual_steps(steps: Any) -> tuple[tuple[int, float], ...]:
    """``[[layer, ratio], ...]`` as int/float pairs; ordering rules are ``BlendConfig``'s."""
    if not isinstance(steps, (list, tuple)):
        raise ValueError(f"gradual must be a list of [layer, ratio] pairs, got {steps!r}")
    out = []
    for step in steps:
        if (not isinstance(step, (list, tuple)) or len(step) != 2
                or isinstance(step[0], bool) or not isinstance(step[0], int)
                or isinstance(step[1], bool) or not isinstance(step[1], (int, float))):
            raise ValueError(f"gradual steps must be [layer, ratio] pairs, got {step!r}")
        out.append((int(step[0]), float(step[1])))
    return tuple(out)


def read_chunk_action(
    actions: Iterable[tuple[str, str, Any]], *, normalized: bool
) -> ChunkAction | None:
    """The CacheBlend action among ``(action_type, action_version, payload)`` triples, or None.

    ``normalized=False`` reads a client's action (a precompute action needs no payload);
    ``normalized=True`` reads the server-written one, which must carry spans and a variant.
    Raises ``ValueError`` for more than one CacheBlend action, an unknown version or a bad
    payload. Spans are not checked against a prompt here (see :func:`validate_spans`).
    """
    ours = [(kind, version, payload) for kind, version, payload in actions if kind in ACTION_TYPES]
    if not ours:
        return None
    if len(ours) > 1:
        raise ValueError(f"kv_hints holds {len(ours)} CacheBlend actions; give at most one")
    kind, version, payload = ours[0]
    if version != ACTION_VERSION:
        raise ValueError(f"{kind} action_version must be {ACTION_VERSION!r}, got {version!r}")
    payload = {} if payload is None else payload
    if not isinstance(payload, Mapping):
        raise ValueError(f"{kind} payload must be an object, got {payload!r}")
    precompute = kind == ACTION_PRECOMPUTE
    if precompute and not normalized:
        return ChunkAction(True, ())
    if "spans" not in payload:
        raise ValueError(f"{kind} payload needs 'spans': a list of [start, end] pairs")
    spans = payload["spans"]
    validate_spans(spans, _max_end(spans))
    variant = payload.get("variant", "") if normalized else ""
    if normalized and (not isinstance(variant, str) or not variant):
        raise ValueError(f"{kind} payload needs a non-empty 'variant' string")
    if precompute and len(spans) != 1:
        raise ValueError(f"a precompute request holds one chunk, got {len(spans)}")
    return ChunkAction(precompute, tuple((s, e) for s, e in spans), variant,
                       payload.get("recompute_ratio"), payload.get("selector"),
                       payload.get("gradual"))


def _max_end(spans: Any) -> int:
    """The largest end of well-formed spans, so range checks leave only shape and order."""
    try:
        return max((int(span[1]) for span in spans), default=0)
    except (TypeError, ValueError, IndexError, KeyError):
        return 0
