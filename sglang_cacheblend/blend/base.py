"""Interfaces of HKVD selection: the per-layer inputs a rule may read and the rule's ABC.

A selector scores the rows of ONE request at ONE layer; budget and top-k are applied by the
caller (:func:`sglang_cacheblend.blend.budget.select_top_rows`), so a new rule is one ``score``
method. New rules that need more data (e.g. question-to-chunk attention) widen
:class:`SelectionInputs` with optional fields; existing selectors keep working.
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
        RoPE-realigned to the new positions (:func:`sglang_cacheblend.blend.rope.realign_keys`).
        Rows with ``reuse_mask`` False hold anything (they are never scored).
    reuse_mask : torch.Tensor
        Shape ``(num_rows,)``, bool. True where the row has cached KV and may take it; False rows
        (missed chunks, the suffix/question) are always recomputed.
    suffix_q : torch.Tensor, optional
        Shape ``(num_suffix, num_q_heads, head_dim)``, same dtype; the query rows of the suffix
        (question) at this layer, after RoPE, for rules that score by question attention.
        ``num_q_heads`` is a multiple of ``num_kv_heads``.
    positions : torch.Tensor, optional
        Shape ``(num_rows,)``, int32/int64, absolute positions of the rows in the prompt. Used
        to break ties (earlier first) and by position-aware rules.
    """

    fresh_k: torch.Tensor
    fresh_v: torch.Tensor
    cached_k: torch.Tensor
    cached_v: torch.Tensor
    reuse_mask: torch.Tensor
    suffix_q: torch.Tensor | None = None
    positions: torch.Tensor | None = None

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
            if q.dim() != 3 or q.shape[2] != shape[2] or q.shape[1] % shape[1] != 0:
                raise ValueError(
                    "suffix_q must have shape (num_suffix, num_q_heads, head_dim) with head_dim "
                    f"{shape[2]} and num_q_heads a multiple of {shape[1]}, got {tuple(q.shape)}"
                )
        if self.positions is not None:
            p = self.positions
            if p.shape != shape[:1] or p.dtype not in (torch.int32, torch.int64):
                raise ValueError(f"positions must be int32/int64 of shape {shape[:1]}")

    @property
    def num_rows(self) -> int:
        """Number of rows (``num_rows``)."""
        return self.fresh_k.shape[0]


class Selector(ABC):
    """A rule that scores a request's rows by how much their cached KV would hurt.

    Subclasses set :attr:`name` (the key in the registry and in ``BlendConfig.selector``) and
    implement :meth:`score`. Selectors hold no per-request state.
    """

    name: ClassVar[str]

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
