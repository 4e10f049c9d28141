"""A request's chunk layout as the tokenizer process decided it, in the form the scheduler trusts.

The tokenizer hook (:mod:`sglang_cacheblend.srt.tokenizer_hooks`) is the only place client input
about chunks is parsed and validated: markers, client ``kv_hints`` actions, per-request blend
settings, and the spans against the final token ids. What it decided travels to the scheduler
as one :class:`ChunkLayout` (inside SGLang's ``kv_hints`` envelope, written by
:mod:`sglang_cacheblend.srt.layout_envelope` under an action type clients may not send).

Trusted, but only for the prompt it was decided on: SGLang's scheduler may still rewrite a
request's ids after tokenization (an abort leaves a one-token stub that still runs a prefill;
``--allow-auto-truncate`` cuts the prompt). So the layout carries the length and a digest of the
ids its spans were checked against, and the scheduler side uses it only for that exact prompt
(:meth:`ChunkLayout.fits_prompt`).

Spans are ``[start, end)`` pairs end to end; the sink ids travel as ids (the scheduler has no
tokenizer); the blend settings travel as the one effective :class:`BlendConfig`.
"""

from __future__ import annotations

import dataclasses
import hashlib
from array import array
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from sglang_cacheblend.chunks import Span, context_variant, family_variant
from sglang_cacheblend.config import BlendConfig

__all__ = ["ChunkLayout", "prompt_digest"]


def prompt_digest(token_ids: Sequence[int]) -> str:
    """A short digest of a prompt's token ids (its int64 bytes), to tell a rewritten prompt."""
    raw = array("q", token_ids).tobytes()
    return hashlib.blake2b(raw, digest_size=12).hexdigest()


@dataclass(frozen=True)
class ChunkLayout:
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
    prompt_len, prompt_digest : int, str
        The prompt the spans were checked against (see :meth:`fits_prompt`).
    """

    precompute: bool
    spans: tuple[Span, ...]
    sink: tuple[int, ...]
    blend: BlendConfig | None
    ratio_policy: str = "fixed"
    context: tuple[int, ...] = ()
    family: str = ""
    prompt_len: int = 0
    prompt_digest: str = ""

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

    def for_prompt(self, token_ids: Sequence[int]) -> ChunkLayout:
        """This layout bound to the prompt its spans were checked against."""
        return dataclasses.replace(self, prompt_len=len(token_ids),
                                   prompt_digest=prompt_digest(token_ids))

    def spans_inside(self, prompt_len: int) -> bool:
        """Cheap bound check: every span lies inside a prompt of ``prompt_len`` tokens, which
        is the decided length (a stub or a truncated prompt is not)."""
        return prompt_len == self.prompt_len and all(end <= prompt_len for _, end in self.spans)

    def fits_prompt(self, token_ids: Sequence[int]) -> bool:
        """The prompt the scheduler runs is the one the layout was decided on (same length and
        ids). False for an abort stub, a truncated or otherwise rewritten prompt."""
        return (self.spans_inside(len(token_ids))
                and prompt_digest(token_ids) == self.prompt_digest)

    def to_payload(self) -> dict[str, Any]:
        """JSON-compatible form (SGLang sends requests to the scheduler as msgpack)."""
        blend = None if self.blend is None else dataclasses.asdict(self.blend)
        return {"precompute": self.precompute, "spans": [list(s) for s in self.spans],
                "sink": list(self.sink), "blend": blend, "ratio_policy": self.ratio_policy,
                "context": list(self.context), "family": self.family,
                "prompt_len": self.prompt_len, "prompt_digest": self.prompt_digest}

    @classmethod
    def from_payload(cls, payload: dict[str, Any]) -> ChunkLayout:
        """Rebuild what :meth:`to_payload` wrote (server-written, so only its shape is read).

        Raises ``KeyError``/``TypeError``/``ValueError`` on a payload of another shape."""
        blend = payload["blend"]
        if blend is not None:
            blend = BlendConfig(**{**blend, "gradual": tuple(map(tuple, blend["gradual"]))})
        spans = tuple((int(start), int(end)) for start, end in payload["spans"])
        return cls(bool(payload["precompute"]), spans, tuple(int(t) for t in payload["sink"]),
                   blend, str(payload["ratio_policy"]),
                   tuple(int(t) for t in payload["context"]), str(payload["family"]),
                   int(payload["prompt_len"]), str(payload["prompt_digest"]))
