"""Interfaces of HKVD selection: the per-layer inputs a rule may read and the rule's ABC.

A selector scores the rows of ONE request at ONE layer; budget and top-k are applied by the
caller (:func:`sglang_cacheblend.blend.budget.select_top_rows`), so a new rule is one ``score``
method. Rules that need more data than K/V (question attention reads the suffix's queries and
the keys outside the rows) get it through optional fields of :class:`SelectionInputs`, and
raise ``ValueError`` when a field they need is missing; the deviation rules ignore them.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import ClassVar

import torch

__all__ = ["SelectionInputs", "Selector"]

_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _check_kv(name: str, t: torch.Tensor, shape: tuple[int, ...] | None) -> None:
    if not isinstance(t, torch.Tensor) or t.dim() != 3 or t.dtype not in _FLOAT_DTYPES:
        got = (tuple(t.shape), t.dtype) if isinstance(t, torch.Tensor) else type(t)
        raise ValueError(
            f"{name} must be a float32/float16/bfloat16 tensor of shape "
            f"(num_rows, num_kv_heads, head_dim), got {got}"
        )
    if shape is not None and tuple(t.shape) != shape:
        raise ValueError(f"{name} must have shape {shape}, got {tuple(t.shape)}")


@dataclass(frozen=True, eq=False)
class SelectionInputs:
    """What a selector may read for one request at one layer.

    Rows are the request's rows computed at this layer (all rows at the check layer, the
    still-selected rows plus the forced ones at a later gradual step), in position order.

    Attributes
    ----------
    fresh_k, fresh_v : torch.Tensor
        Shape ``(num_rows, num_kv_heads, head_dim)``; float32, float16 or bfloat16. K/V just
        computed at this layer in the current prompt; K after RoPE at the row's new position.
    cached_k, cached_v : torch.Tensor
        Same shape, dtype and device as ``fresh_k``. The cached K/V of the same rows, K already
        RoPE-realigned to the new positions (:func:`sglang_cacheblend.blend.realign.realign_keys`).
        Rows with ``reuse_mask`` False hold anything (they are never scored).
    reuse_mask : torch.Tensor
        Shape ``(num_rows,)``, bool. True where the row has cached KV and may take it; False rows
        (missed chunks, the suffix/question) are always recomputed.
    suffix_q : torch.Tensor, optional
        Shape ``(num_suffix, num_q_heads, head_dim)``, same dtype and device; the queries, after
        RoPE, of the **suffix**: the request's rows after its last reused row (the question and
        the chat template's tail), which have no cached KV and are computed at every layer. They
        are always the *last* ``num_suffix`` rows of these inputs (rows are in position order
        and never-reused rows are never dropped), so a rule finds their keys in ``fresh_k[-S:]``.
        ``num_q_heads`` is a multiple of ``num_kv_heads`` (query head ``h`` reads KV head
        ``h // (num_q_heads // num_kv_heads)``). Read by the question-attention rules.
    positions : torch.Tensor, optional
        Shape ``(num_rows,)``, int32/int64, absolute positions of the rows in the prompt. Used
        to break ties (earlier first), for the causal mask among suffix rows, and by
        position-aware rules.
    context_k : torch.Tensor, optional
        Shape ``(num_context, num_kv_heads, head_dim)``, same dtype and device: the keys at this
        layer of every position the suffix sees that is *not* one of these rows (a cached
        prefix; reused rows not computed at this layer, holding their cached KV), in any order.
        All of them precede every suffix row. Only the softmax denominator of question
        attention reads them, so the attention a row receives is its share of the suffix's
        real attention, not of a renormalised subset. Default: no such keys.
    lookahead_mass : torch.Tensor, optional
        Shape ``(num_layers, num_rows)``, float32, same device: row ``l`` is the attention mass
        the suffix's queries (summed over suffix rows and query heads) put on each row at layer
        ``l`` when the suffix alone is run ahead through the layers after this selection layer
        on the KV as it stands (reused rows keep their cached KV). Rows of layers up to the
        selection layer, and before the rule's :meth:`Selector.lookahead_first_layer`, are
        zero. Filled by the forward loop only for rules that set
        :attr:`Selector.reads_lookahead` (:mod:`sglang_cacheblend.blend.lookahead`).
    """

    fresh_k: torch.Tensor
    fresh_v: torch.Tensor
    cached_k: torch.Tensor
    cached_v: torch.Tensor
    reuse_mask: torch.Tensor
    suffix_q: torch.Tensor | None = None
    positions: torch.Tensor | None = None
    context_k: torch.Tensor | None = None
    lookahead_mass: torch.Tensor | None = None

    def __post_init__(self) -> None:
        _check_kv("fresh_k", self.fresh_k, None)
        shape = tuple(self.fresh_k.shape)
        for name in ("fresh_v", "cached_k", "cached_v"):
            _check_kv(name, getattr(self, name), shape)
            if getattr(self, name).device != self.fresh_k.device:
                raise ValueError(f"{name} must be on {self.fresh_k.device}")
        mask = self.reuse_mask
        if (
            not isinstance(mask, torch.Tensor)
            or mask.dtype != torch.bool
            or mask.shape != shape[:1]
        ):
            raise ValueError(f"reuse_mask must be a bool tensor of shape {shape[:1]}")
        if self.suffix_q is not None:
            q = self.suffix_q
            if (
                q.dim() != 3
                or q.shape[2] != shape[2]
                or q.shape[1] % shape[1] != 0
                or q.shape[0] > shape[0]
            ):
                raise ValueError(
                    "suffix_q must have shape (num_suffix, num_q_heads, head_dim) with "
                    f"num_suffix <= {shape[0]}, head_dim {shape[2]} and num_q_heads a multiple "
                    f"of {shape[1]}, got {tuple(q.shape)}"
                )
            if q.dtype not in _FLOAT_DTYPES or q.device != self.fresh_k.device:
                raise ValueError(f"suffix_q must be a float tensor on {self.fresh_k.device}")
        if self.context_k is not None:
            _check_kv("context_k", self.context_k, None)
            ctx = self.context_k
            if ctx.shape[1:] != shape[1:] or ctx.device != self.fresh_k.device:
                raise ValueError(
                    f"context_k must have shape (num_context, {shape[1]}, {shape[2]}) on "
                    f"{self.fresh_k.device}, got {tuple(self.context_k.shape)}"
                )
        if self.lookahead_mass is not None:
            m = self.lookahead_mass
            if m.dim() != 2 or m.shape[1] != shape[0] or m.dtype != torch.float32:
                raise ValueError(
                    f"lookahead_mass must be float32 of shape (num_layers, {shape[0]}), got "
                    f"{tuple(m.shape)} {m.dtype}"
                )
        if self.positions is not None:
            p = self.positions
            if p.shape != shape[:1] or p.dtype not in (torch.int32, torch.int64):
                raise ValueError(f"positions must be int32/int64 of shape {shape[:1]}")

    @property
    def num_rows(self) -> int:
        """Number of rows (``num_rows``)."""
        return self.fresh_k.shape[0]

    @property
    def num_suffix(self) -> int:
        """Number of suffix rows (``num_suffix``; 0 when ``suffix_q`` is None)."""
        return 0 if self.suffix_q is None else self.suffix_q.shape[0]


class Selector(ABC):
    """A rule that scores a request's rows by how much their cached KV would hurt.

    Subclasses set :attr:`name` (the key in the registry and in ``BlendConfig.selector``) and
    implement :meth:`score`. Selectors hold no per-request state. A rule that reads
    ``suffix_q``/``context_k`` sets :attr:`reads_suffix`, so callers gather those (a pass over
    the request's stored keys) only for the rules that use them; likewise
    :attr:`reads_lookahead` asks the forward loop to run the suffix ahead through the later
    layers (:mod:`sglang_cacheblend.blend.lookahead`) and fill ``lookahead_mass``.
    """

    name: ClassVar[str]
    reads_suffix: ClassVar[bool] = False
    reads_lookahead: ClassVar[bool] = False

    def lookahead_first_layer(self, num_layers: int) -> int:
        """First layer whose ``lookahead_mass`` this rule reads; the lookahead runs the layers
        before it with the fused attention kernel and leaves their masses zero (an explicit
        softmax costs more). Only asked of rules with :attr:`reads_lookahead`."""
        return 0

    @abstractmethod
    def score(self, inputs: SelectionInputs) -> torch.Tensor:
        """Score every row.

        Parameters
        ----------
        inputs : SelectionInputs
            One request, one layer.

        Returns
        -------
        torch.Tensor
            Shape ``(num_rows,)``, float32, on the inputs' device; higher means recompute
            first. Values of rows with ``reuse_mask`` False are ignored.
        """
