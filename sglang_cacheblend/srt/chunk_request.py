"""A request's chunk layout as the tokenizer process decided it, in the form the scheduler trusts.

The tokenizer hook (:mod:`.tokenizer_hooks`) is the only place client input about chunks is
parsed and validated: markers, client ``kv_hints`` actions, per-request blend settings, and the
spans against the final token ids. What it decided travels to the scheduler as one
:class:`ChunkRequest` inside SGLang's ``kv_hints`` envelope, under an action type of the
server's own (:data:`SERVER_ACTION`) that clients may not send (the hook refuses it). The
scheduler reads it back without re-validating; with the tokenizer hook verified at startup
(:mod:`.hooks`), nothing else can have written it.

Spans are ``[start, end)`` pairs end to end; the sink ids travel as ids (the scheduler has no
tokenizer); the blend settings travel as the one effective :class:`BlendConfig`.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from sglang.srt.managers.kv_hints import KvHintAction, KvHintsEnvelope

from sglang_cacheblend.chunks import ACTION_TYPES, Span, context_variant, family_variant
from sglang_cacheblend.config import BlendConfig

if TYPE_CHECKING:
    from sglang.srt.managers.schedule_batch import Req

__all__ = ["SERVER_ACTION", "ChunkRequest", "chunk_request_of", "envelope_with"]

logger = logging.getLogger(__name__)

SERVER_ACTION = "cacheblend.server"
"""``kv_hints`` action type of the server-written :class:`ChunkRequest` (reserved)."""
_SERVER_ACTION_VERSION = "1"


@dataclass(frozen=True)
class ChunkRequest:
    """What the scheduler needs to know about one request's chunks.

    Attributes
    ----------
    precompute : bool
        The request computes its single chunk standalone (after ``sink``) for the chunk index.
    spans : tuple of (int, int)
        ``[start, end)`` chunk spans over the request's final ``input_ids``: sorted, disjoint,
        inside the prompt (checked in the tokenizer process).
    sink : tuple of int
        The attention-sink ids chunk KV is computed after (and which are then dropped).
    blend : BlendConfig or None
        The request's effective blend settings (the server's with its own overrides), checked
        against the served model; None when the request does not blend (a precompute).
    ratio_policy : str
        "controller": the Loading Controller replaces ``blend.recompute_ratio`` at admission;
        "fixed": it does not.
    context : tuple of int
        The chunk context's ids (``--cacheblend-chunk-context``): chunk KV is computed after
        ``sink + context``, both then dropped; empty for standalone chunk KV. In a family,
        the precompute's own context (a blended request's is empty).
    family : str
        The context family (``context_family``) the request's chunks belong to ("" for
        none): their variant names the family, not each chunk's context.
    """

    precompute: bool
    spans: tuple[Span, ...]
    sink: tuple[int, ...]
    blend: BlendConfig | None
    ratio_policy: str = "fixed"
    context: tuple[int, ...] = ()
    family: str = ""

    @property
    def variant(self) -> str:
        """Chunk-namespace variant: how this request's chunk KV is computed."""
        if self.family:
            return family_variant(self.sink, self.family)
        return context_variant(self.sink, self.context)

    @property
    def prefix_ids(self) -> tuple[int, ...]:
        """Everything chunk KV is computed after: the sink, then the chunk context."""
        return (*self.sink, *self.context)

    @property
    def chunk_tokens(self) -> int:
        return sum(end - start for start, end in self.spans)

    def to_payload(self) -> dict[str, Any]:
        """JSON-compatible form (SGLang sends requests to the scheduler as msgpack)."""
        blend = None if self.blend is None else dataclasses.asdict(self.blend)
        return {"precompute": self.precompute, "spans": [list(s) for s in self.spans],
                "sink": list(self.sink), "blend": blend, "ratio_policy": self.ratio_policy,
                "context": list(self.context), "family": self.family}

    @classmethod
    def from_payload(cls, payload: dict[str, Any]) -> ChunkRequest:
        """Rebuild what :meth:`to_payload` wrote (server-written, so only its shape is read)."""
        blend = payload["blend"]
        if blend is not None:
            blend = BlendConfig(**{**blend, "gradual": tuple(map(tuple, blend["gradual"]))})
        spans = tuple((int(start), int(end)) for start, end in payload["spans"])
        return cls(bool(payload["precompute"]), spans, tuple(int(t) for t in payload["sink"]),
                   blend, str(payload.get("ratio_policy", "fixed")),
                   tuple(int(t) for t in payload.get("context", ())),
                   str(payload.get("family", "")))


def envelope_with(
    envelope: KvHintsEnvelope | None, request: ChunkRequest, rid: Any
) -> KvHintsEnvelope:
    """``envelope`` with every CacheBlend action replaced by ``request`` (others kept)."""
    ours = KvHintAction(action_id=SERVER_ACTION, action_type=SERVER_ACTION,
                        action_version=_SERVER_ACTION_VERSION, payload=request.to_payload())
    if envelope is None:
        return KvHintsEnvelope(protocol_version="1", message_id=str(rid), actions=[ours])
    reserved = (*ACTION_TYPES, SERVER_ACTION)
    others = [a for a in envelope.actions if a.action_type not in reserved]
    return KvHintsEnvelope(protocol_version=envelope.protocol_version,
                           message_id=envelope.message_id, actions=[*others, ours])


def chunk_request_of(req: Req) -> ChunkRequest | None:
    """The server-written chunk request of a scheduler ``Req``, or None.

    Never raises (the scheduler must keep serving): a payload that does not decode can only
    come from a path around the tokenizer hook; it is logged and the request served normally.
    """
    envelope = getattr(req, "kv_hints", None)
    if envelope is None:
        return None
    for action in envelope.actions:
        if action.action_type == SERVER_ACTION:
            try:
                return ChunkRequest.from_payload(action.payload)
            except (KeyError, TypeError, ValueError) as exc:
                logger.error("request %s: ignoring a malformed %s action: %s",
                             req.rid, SERVER_ACTION, exc)
                return None
    return None
