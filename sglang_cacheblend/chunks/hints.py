"""The ``kv_hints`` actions a client sends to mark chunks or ask for a precompute.

SGLang's ``kv_hints`` field carries an envelope of typed actions to the server; CacheBlend
defines two. :data:`ACTION_CHUNKS` marks ``[start, end)`` spans of ``input_ids`` as chunks (with
optional per-request blend settings); :data:`ACTION_PRECOMPUTE` asks the server to compute a
request's one chunk standalone for the chunk index. :func:`read_client_action` is the one parser
of what a client sent; the server replaces it by a trusted form of its own
(``sglang_cacheblend.srt.chunk_request``), so the scheduler never parses client input. Pure
Python.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from sglang_cacheblend.chunks.context import CONTEXT_CHOICES, check_context_ids, check_family
from sglang_cacheblend.chunks.spans import Span, validate_spans
from sglang_cacheblend.config import SELECTOR_NAMES

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
    recompute_ratio: float | None = None,
    selector: str | None = None,
    gradual: Sequence[tuple[int, float]] | None = None,
    ratio_policy: str | None = None,
    chunk_context: str | None = None,
    recompute_window: int | None = None,
    context_family: str | None = None,
    message_id: str = "cacheblend",
) -> dict[str, Any]:
    """A ``kv_hints`` envelope marking ``[start, end)`` spans of ``input_ids`` as chunks.

    ``recompute_ratio``, ``selector`` and ``gradual`` (``[(layer, ratio), ...]``) override the
    server's blend settings for this request only; ``ratio_policy="controller"`` lets the
    server's Loading Controller pick the ratio (``"fixed"``: never); ``chunk_context="none"``
    reuses chunk KV computed standalone even on a server with a chunk context
    (``"server"``: the server's, the default); ``recompute_window`` recomputes reused rows in
    contiguous runs of that many rows (``BlendConfig.recompute_window``); ``context_family``
    reuses the chunks precomputed in that family, each after its own context
    (:func:`precompute_hints`); a chunk the family lacks is prefilled in place, and a request
    with none of its chunks in the family is a normal prefill.
    """
    payload: dict[str, Any] = {"spans": [[int(s), int(e)] for s, e in spans]}
    overrides = {"recompute_ratio": recompute_ratio, "selector": selector,
                 "gradual": None if gradual is None else [[int(l), float(r)] for l, r in gradual],
                 "ratio_policy": ratio_policy, "chunk_context": chunk_context,
                 "recompute_window": recompute_window, "context_family": context_family}
    payload.update({k: v for k, v in overrides.items() if v is not None})
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


_PAYLOAD_KEYS = frozenset({"spans", "recompute_ratio", "selector", "gradual", "ratio_policy",
                           "chunk_context", "recompute_window", "context_family"})
_PRECOMPUTE_KEYS = frozenset({"chunk_context", "context_family", "context_ids"})
RATIO_POLICIES = ("fixed", "controller")


@dataclass(frozen=True)
class ClientAction:
    """What a client asked for, checked for shape and range (not yet against its prompt).

    ``precompute``: compute the request's single chunk standalone for the chunk index;
    otherwise ``spans`` (possibly empty, when the chunks are marked in the text instead) are the
    chunks to look up. The other fields override the server's blend settings (None: the
    server's).
    """

    precompute: bool
    spans: tuple[Span, ...] = ()
    recompute_ratio: float | None = None
    selector: str | None = None
    gradual: tuple[tuple[int, float], ...] | None = None
    ratio_policy: str | None = None
    chunk_context: str | None = None
    recompute_window: int | None = None
    context_family: str | None = None
    context_ids: tuple[int, ...] | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "spans", validate_spans(self.spans, _max_end(self.spans)))
        if self.precompute and self.spans:
            raise ValueError("a precompute action takes no spans: its prompt is the one chunk")
        ratio = self.recompute_ratio
        if ratio is not None and not _is_unit_number(ratio):
            raise ValueError(f"recompute_ratio must be a number in [0, 1], got {ratio!r}")
        if self.selector is not None and (
            not isinstance(self.selector, str) or self.selector not in SELECTOR_NAMES
        ):
            raise ValueError(
                f"selector must be one of {sorted(SELECTOR_NAMES)}, got {self.selector!r}"
            )
        if self.gradual is not None:
            object.__setattr__(self, "gradual", _gradual_steps(self.gradual))
        if self.ratio_policy is not None and self.ratio_policy not in RATIO_POLICIES:
            raise ValueError(f"ratio_policy must be one of {list(RATIO_POLICIES)}, got "
                             f"{self.ratio_policy!r}")
        if self.ratio_policy == "controller" and (
                self.recompute_ratio is not None or self.gradual is not None):
            raise ValueError("ratio_policy 'controller' picks the ratio: give no "
                             "recompute_ratio or gradual with it")
        window = self.recompute_window
        if window is not None and (isinstance(window, bool) or not isinstance(window, int)
                                   or not 1 <= window <= 4096):
            raise ValueError(f"recompute_window must be an integer in [1, 4096], got {window!r}")
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

    @property
    def overrides_blend(self) -> bool:
        """Whether the request sets any blend setting of its own."""
        return any(v is not None for v in (self.recompute_ratio, self.selector, self.gradual,
                                           self.recompute_window))


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
    return ClientAction(False, tuple(spans), payload.get("recompute_ratio"),
                        payload.get("selector"), payload.get("gradual"),
                        payload.get("ratio_policy"), payload.get("chunk_context"),
                        payload.get("recompute_window"), payload.get("context_family"))


def _is_unit_number(value: Any) -> bool:
    return (not isinstance(value, bool) and isinstance(value, (int, float))
            and math.isfinite(value) and 0 <= value <= 1)


def _gradual_steps(steps: Any) -> tuple[tuple[int, float], ...]:
    """``[[layer, ratio], ...]`` as int/float pairs; ordering rules are ``BlendConfig``'s."""
    if not isinstance(steps, (list, tuple)):
        raise ValueError(f"gradual must be a list of [layer, ratio] pairs, got {steps!r}")
    out = []
    for step in steps:
        if (not isinstance(step, (list, tuple)) or len(step) != 2
                or isinstance(step[0], bool) or not isinstance(step[0], int)
                or not _is_unit_number(step[1])):
            raise ValueError(f"gradual steps must be [layer, ratio in [0, 1]] pairs, got {step!r}")
        out.append((int(step[0]), float(step[1])))
    return tuple(out)


def _max_end(spans: Any) -> int:
    """The largest end of well-formed spans, so range checks leave only shape and order."""
    try:
        ends = [span[1] for span in spans]
    except (TypeError, IndexError, KeyError):
        return 0
    return max((e for e in ends if isinstance(e, int) and not isinstance(e, bool)), default=0)
