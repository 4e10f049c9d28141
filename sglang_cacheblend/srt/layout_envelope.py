"""A :class:`~sglang_cacheblend.serving.layout.ChunkLayout` in and out of SGLang's ``kv_hints``.

The tokenizer hook writes the layout into the request's ``kv_hints`` envelope under an action
type of the server's own (:data:`SERVER_ACTION`) that clients may not send (the hook refuses
it); the scheduler reads it back without re-validating. With the tokenizer hook verified at
startup (:mod:`.hooks`), nothing else can have written it. A scheduler ``Req`` is decoded once
(:func:`layout_of` keeps the result for the life of the ``Req`` object).
"""

from __future__ import annotations

import logging
import weakref
from typing import TYPE_CHECKING, Any

from sglang.srt.managers.kv_hints import KvHintAction, KvHintsEnvelope

from sglang_cacheblend.chunks import ACTION_TYPES
from sglang_cacheblend.serving.layout import ChunkLayout

if TYPE_CHECKING:
    from sglang.srt.managers.schedule_batch import Req

__all__ = ["SERVER_ACTION", "envelope_with", "layout_of"]

logger = logging.getLogger(__name__)

SERVER_ACTION = "cacheblend.server"
"""``kv_hints`` action type of the server-written :class:`ChunkLayout` (reserved)."""
_SERVER_ACTION_VERSION = "2"

_NONE = object()
_decoded: weakref.WeakKeyDictionary[Any, tuple[Any, Any]] = weakref.WeakKeyDictionary()


def envelope_with(
    envelope: KvHintsEnvelope | None, layout: ChunkLayout, rid: Any
) -> KvHintsEnvelope:
    """``envelope`` with every CacheBlend action replaced by ``layout`` (others kept)."""
    ours = KvHintAction(action_id=SERVER_ACTION, action_type=SERVER_ACTION,
                        action_version=_SERVER_ACTION_VERSION, payload=layout.to_payload())
    if envelope is None:
        return KvHintsEnvelope(protocol_version="1", message_id=str(rid), actions=[ours])
    reserved = (*ACTION_TYPES, SERVER_ACTION)
    others = [a for a in envelope.actions if a.action_type not in reserved]
    return KvHintsEnvelope(protocol_version=envelope.protocol_version,
                           message_id=envelope.message_id, actions=[*others, ours])


def layout_of(req: Req) -> ChunkLayout | None:
    """The server-written chunk layout of a scheduler ``Req``, or None; decoded once per
    ``Req`` (and again only if SGLang replaced its ``kv_hints``).

    Never raises (the scheduler must keep serving): a payload that does not decode can only
    come from a path around the tokenizer hook; it is logged and the request served normally.
    """
    envelope = getattr(req, "kv_hints", None)
    if envelope is None:
        return None
    try:
        cached = _decoded.get(req)
    except TypeError:  # a Req that cannot be weakly referenced: decode every time
        return _decode(req, envelope)
    if cached is not None and cached[0] is envelope:
        return None if cached[1] is _NONE else cached[1]
    layout = _decode(req, envelope)
    _decoded[req] = (envelope, _NONE if layout is None else layout)
    return layout


def _decode(req: Req, envelope: Any) -> ChunkLayout | None:
    for action in getattr(envelope, "actions", ()):
        if action.action_type == SERVER_ACTION:
            try:
                return ChunkLayout.from_payload(action.payload)
            except (KeyError, TypeError, ValueError) as exc:
                logger.error("request %s: ignoring a malformed %s action: %s",
                             getattr(req, "rid", "?"), SERVER_ACTION, exc)
                return None
    return None
