"""The selection budget and the top-k step shared by every selector.

Budget rule (exact, per request, never across a batch): selecting ratio ``r`` of ``n`` reused
tokens keeps

    k = 0                                   if r == 0      (full KV reuse)
    k = min(n, max(round_half_up(r * n), min_tokens))     otherwise

where ``round_half_up(x) = floor(x + 1/2)`` (2.5 -> 3, 2.4 -> 2), computed exactly on the
ratio's shortest decimal form (``Fraction(repr(r))``), so binary representation error never
moves a half: ``0.29 * 50`` gives 15 (in floats ``0.29 * 50 == 14.499999999999998``),
``0.15 * 100`` gives 15.

Ties in the score are broken deterministically: the earlier position wins (a stable sort by
position, then a stable descending sort by score).
"""

from __future__ import annotations

import math
from fractions import Fraction

import torch

__all__ = ["select_top_rows", "selection_budget"]


def selection_budget(ratio: float, num_reused: int, min_tokens: int = 0) -> int:
    """Number of reused tokens to recompute for one request.

    Parameters
    ----------
    ratio : float
        Share of the reused tokens to recompute, in ``[0, 1]``.
    num_reused : int
        Number of tokens of the request that have cached KV (``n``).
    min_tokens : int
        Lower bound applied when ``ratio > 0``; the result never exceeds ``num_reused``.

    Returns
    -------
    int
        ``k`` as in the module docstring, ``0 <= k <= num_reused``.
    """
    if not (0.0 <= ratio <= 1.0):
        raise ValueError(f"ratio must be in [0, 1], got {ratio}")
    if num_reused < 0 or min_tokens < 0:
        raise ValueError(f"num_reused and min_tokens must be >= 0, got {num_reused}, {min_tokens}")
    if ratio == 0.0:
        return 0
    k = math.floor(Fraction(repr(float(ratio))) * num_reused + Fraction(1, 2))
    return min(num_reused, max(k, min_tokens))


def select_top_rows(
    scores: torch.Tensor,
    reuse_mask: torch.Tensor,
    num_selected: int,
    positions: torch.Tensor | None = None,
) -> torch.Tensor:
    """Rows to recompute: the ``num_selected`` top-scoring reused rows plus every row that is not
    reused.

    Parameters
    ----------
    scores : torch.Tensor
        Shape ``(num_rows,)``, floating point; higher means "recompute first". Entries of rows with
        ``reuse_mask`` False are ignored. NaN is rejected.
    reuse_mask : torch.Tensor
        Shape ``(num_rows,)``, bool. True where the row's cached KV may be reused; False rows (no
        cached KV, the suffix/question) are always returned.
    num_selected : int
        How many reused rows to keep, ``0 <= num_selected <= reuse_mask.sum()``.
    positions : torch.Tensor, optional
        Shape ``(num_rows,)``, integer absolute positions, used to break score ties (earlier
        position first). Default: the row index, i.e. rows are assumed in position order.

    Returns
    -------
    torch.Tensor
        Shape ``(num_kept,)``, int64, on the device of ``scores``: indices into the rows, sorted
        ascending, ``num_kept = num_selected + (~reuse_mask).sum()``.
    """
    if scores.dim() != 1 or not scores.is_floating_point():
        raise ValueError(
            f"scores must be a 1-D float tensor, got {tuple(scores.shape)} {scores.dtype}"
        )
    if reuse_mask.shape != scores.shape or reuse_mask.dtype != torch.bool:
        raise ValueError(
            f"reuse_mask must be bool of shape {tuple(scores.shape)}, got "
            f"{tuple(reuse_mask.shape)} {reuse_mask.dtype}"
        )
    reused = torch.nonzero(reuse_mask).flatten()
    if not (0 <= num_selected <= reused.numel()):
        raise ValueError(f"num_selected must be in [0, {reused.numel()}], got {num_selected}")
    forced = torch.nonzero(~reuse_mask).flatten()
    if num_selected == 0:
        return forced
    cand = scores[reused].float()
    if torch.isnan(cand).any():
        raise ValueError("scores of reused rows contain NaN")
    if positions is not None:
        if positions.shape != scores.shape or positions.is_floating_point():
            raise ValueError(f"positions must be integer of shape {tuple(scores.shape)}")
        by_pos = torch.argsort(positions[reused], stable=True)
        reused, cand = reused[by_pos], cand[by_pos]
    order = torch.argsort(cand, descending=True, stable=True)
    top = reused[order[:num_selected]]
    return torch.sort(torch.cat([top, forced])).values
