"""The ``kv_hints`` actions a client sends to mark chunks or ask for a precompute.

SGLang's ``kv_hints`` field carries an envelope of typed actions to the server; CacheBlend
defines two. :data:`ACTION_CHUNKS` marks ``[start, end)`` spans of ``input_ids`` as chunks (with
optional per-request blend settings); :data:`ACTION_PRECOMPUTE` asks the server to compute a
request's one chunk standalone for the chunk index. :func:`read_client_action` is the one parser
of what a client sent; the server replaces it by a trusted form of its own
(:mod:`sglang_cacheblend.serving.layout`), so the scheduler never parses client input. The
per-request blend settings are the rows of :data:`sglang_cacheblend.options.REQUEST_SETTINGS`:
their names are the payload keys, and their values are checked once, by ``BlendConfig``, when
they are merged with the server's (:func:`sglang_cacheblend.options.effective_config`). Pure
Python.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

from sglang_cacheblend.chunks.context import CONTEXT_CHOICES, check_context_ids, check_family
from sglang_cacheblend.chunks.spans import Span, validate_spans
from sglang_cacheblend.options import REQUEST_SETTINGS, read_request_settings

__all__ = [
    "ACTION_CHUNKS", "ACTION_PRECOMPUTE", "ACTION_TYPES", "ACTION_VERSION", "ClientAction",
    "chunk_hints", "precompute_hints", "read_client_action",
]

ACTION_CHUNKS = "cacheblend.chunks"
ACTION_PRECOMPUTE = "cacheblend.precompute"
ACTION_VERSION = "1"
ACTION_TYPES = (ACTION_CHUNKS, ACTION_PRECOMPUTE)


def chunk_hints(
    spans: Iterable[Span],
    *,
    chunk_context: str | None = None,
    context_family: str | None = None,
    message_id: str = "cacheblend",
    **settings: Any,
) -> dict[str, Any]:
    """A ``kv_hints`` envelope marking ``[start, end)`` spans of ``input_ids`` as chunks.

    ``settings`` override the server's for this request only, by the names of
    :data:`~sglang_cacheblend.options.REQUEST_SETTINGS`: ``recompute_ratio``, ``selector``,
    ``gradual`` (``[(layer, ratio), ...]``), ``recompute_window`` (the ``BlendConfig`` fields)
    and ``ratio_policy`` (``"controller"`` lets the server's Loading Controller pick the ratio,
    ``"fixed"`` never); None leaves the server's. ``chunk_context="none"`` reuses chunk KV
    computed standalone even on a server with a chunk context (``"server"``: the server's, the
    default); ``context_family`` reuses the chunks precomputed in that family, each after its
    own context (:func:`precompute_hints`); a chunk the family lacks is prefilled in place, and
    a request with none of its chunks in the family is a normal prefill.
    """
    unknown = sorted(set(settings) - _SETTING_NAMES)
    if unknown:
        raise TypeError(f"chunk_hints got unknown settings {unknown}; known: "
                        f"{sorted(_SETTING_NAMES)}")
    payload: dict[str, Any] = {"spans": [[int(s), int(e)] for s, e in spans]}
    routing = {"chunk_context": chunk_context, "context_family": context_family}
    payload.update({k: v for k, v in {**settings, **routing}.items() if v is not None})
    return envelope(ACTION_CHUNKS, payload, message_id)


def precompute_hints(*, chunk_context: str | None = None, context_family: str | None = None,
                     context_ids: Sequence[int] | None = None,
                     message_id: str = "cacheblend") -> dict[str, Any]:
    """A ``kv_hints`` envelope asking the server to compute the request's one chunk for the
    chunk index: after the server's chunk context, standalone with ``chunk_context="none"``, or
    after the sink and ``context_ids`` as a member of ``context_family``, where requests
    naming the family find it (the two go together)."""
    payload: dict[str, Any] = {} if chunk_context is None else {"chunk_context": chunk_context}
    if context_family is not None:
        payload["context_family"] = context_family
    if context_ids is not None:
        payload["context_ids"] = [int(t) for t in context_ids]
    return envelope(ACTION_PRECOMPUTE, payload, message_id)


def envelope(action_type: str, payload: dict[str, Any], message_id: str) -> dict[str, Any]:
    """SGLang's ``kv_hints`` envelope (JSON form) holding one action."""
    action = {
        "action_id": action_type,
        "action_type": action_type,
        "action_version": ACTION_VERSION,
        "payload": payload,
    }
    return {"protocol_version": "1", "message_id": message_id, "actions": [action]}


_SETTING_NAMES = frozenset(row.name for row in REQUEST_SETTINGS)
_PAYLOAD_KEYS = frozenset({"spans", "chunk_context", "context_family"}) | _SETTING_NAMES
_PRECOMPUTE_KEYS = frozenset({"chunk_context", "context_family", "context_ids"})
_SETS_THE_RATIO = ("recompute_ratio", "gradual")


@dataclass(frozen=True)
class ClientAction:
    """What a client asked for, checked for shape (not yet against its prompt or the server).

    ``precompute``: compute the request's single chunk standalone for the chunk index;
    otherwise ``spans`` (possibly empty, when the chunks are marked in the text instead) are the
    chunks to look up. ``settings`` are the request's own settings (the rows of
    :data:`~sglang_cacheblend.options.REQUEST_SETTINGS` it gave, read-only; absent: the
    server's), merged with the server's by :func:`sglang_cacheblend.options.effective_config`,
    which checks them. ``chunk_context``, ``context_family`` and ``context_ids`` say which
    chunk KV the request means.
    """

    precompute: bool
    spans: tuple[Span, ...] = ()
    settings: Mapping[str, Any] = field(default_factory=dict)
    chunk_context: str | None = None
    context_family: str | None = None
    context_ids: tuple[int, ...] | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "spans", validate_spans(self.spans, _max_end(self.spans)))
        if self.precompute and self.spans:
            raise ValueError("a precompute action takes no spans: its prompt is the one chunk")
        unknown = sorted(set(self.settings) - _SETTING_NAMES)
        if unknown:
            raise ValueError(f"unknown settings {unknown}; known: {sorted(_SETTING_NAMES)}")
        settings = read_request_settings(self.settings)
        object.__setattr__(self, "settings", MappingProxyType(settings))
        if self.precompute and settings:
            raise ValueError("a precompute action takes no blend settings: its chunk's KV is "
                             "computed in full")
        if settings.get("ratio_policy") == "controller" and any(
                name in settings for name in _SETS_THE_RATIO):
            raise ValueError("ratio_policy 'controller' picks the ratio: give no "
                             "recompute_ratio or gradual with it")
        if self.chunk_context is not None and self.chunk_context not in CONTEXT_CHOICES:
            raise ValueError(f"chunk_context must be one of {list(CONTEXT_CHOICES)}, got "
                             f"{self.chunk_context!r}")
        self._check_family()

    def _check_family(self) -> None:
        """A family replaces the server's context: never both; a precompute in a family says
        the chunk's own context, a blended request only names the family."""
        if self.context_family is None:
            if self.context_ids is not None:
                raise ValueError("context_ids need a context_family to file the chunk under")
            return
        check_family(self.context_family)
        if self.chunk_context is not None:
            raise ValueError("give chunk_context or context_family, not both")
        if self.precompute:
            if self.context_ids is None:
                raise ValueError("a precompute in a context_family needs its context_ids")
            object.__setattr__(self, "context_ids", check_context_ids(self.context_ids))
        elif self.context_ids is not None:
            raise ValueError("context_ids belong to precompute requests; a blended request "
                             "names the context_family only")


def read_client_action(actions: Iterable[tuple[str, str, Any]]) -> ClientAction | None:
    """The CacheBlend action among ``(action_type, action_version, payload)`` triples, or None.

    Raises ``ValueError`` naming the problem for more than one CacheBlend action, an unknown
    version, an unknown payload key or a bad value (the HTTP layer answers 400).
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
    known = _PRECOMPUTE_KEYS if kind == ACTION_PRECOMPUTE else _PAYLOAD_KEYS
    unknown = sorted(set(payload) - known)
    if unknown:
        raise ValueError(f"{kind} payload has unknown keys {unknown}; known: "
                         f"{sorted(known)}")
    if kind == ACTION_PRECOMPUTE:
        return ClientAction(True, chunk_context=payload.get("chunk_context"),
                            context_family=payload.get("context_family"),
                            context_ids=payload.get("context_ids"))
    if "spans" not in payload:
        raise ValueError(f"{kind} payload needs 'spans': a list of [start, end] pairs")
    spans = payload["spans"]
    if not isinstance(spans, (list, tuple)):  # ClientAction checks each span
        raise ValueError(f"chunk spans must be a list of [start, end] pairs, got {spans!r}")
    settings = {k: v for k, v in payload.items() if k in _SETTING_NAMES}
    return ClientAction(False, tuple(spans), settings, chunk_context=payload.get("chunk_context"),
                        context_family=payload.get("context_family"))


def _max_end(spans: Any) -> int:
    """The largest end of well-formed spans, so range checks leave only shape and order."""
    try:
        ends = [span[1] for span in spans]
    except (TypeError, IndexError, KeyError):
        return 0
    return max((e for e in ends if isinstance(e, int) and not isinstance(e, bool)), default=0)
