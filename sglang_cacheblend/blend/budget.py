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

__all__ = ["select_top_rows", "select_top_windows", "selection_budget"]


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


def select_top_windows(
    scores: torch.Tensor,
    reuse_mask: torch.Tensor,
    num_selected: int,
    window: int,
) -> torch.Tensor:
    """Like :func:`select_top_rows`, but the reused rows are kept in runs of ``window``
    neighbouring reused rows (row order is position order), within the same budget.

    Why: a scattered recomputed row still reads its neighbours' stale KV at every later layer,
    so it inherits their error; recomputing a short contiguous run around each high-scoring row
    repairs the neighbourhood it reads (CacheClip's grouping; "contiguity, not importance").
    Greedy: one window centred on each reused row, ranked by the sum of its rows' scores (ties:
    the centre's own score), taken when it does not overlap a window already taken, until
    ``num_selected`` rows are kept (the last window keeps its best rows to fit). ``window ==
    1`` is :func:`select_top_rows` exactly.
    """
    if isinstance(window, bool) or not isinstance(window, int) or window < 1:
        raise ValueError(f"window must be an int >= 1, got {window!r}")
    if window == 1 or num_selected == 0:
        return select_top_rows(scores, reuse_mask, num_selected)
    select_top_rows(scores, reuse_mask, num_selected)  # the same argument checks
    reused = torch.nonzero(reuse_mask).flatten()
    forced = torch.nonzero(~reuse_mask).flatten()
    cand = scores[reused].float().cpu()
    n = cand.numel()
    width = min(window, n)
    sums = cand.unfold(0, width, 1).sum(dim=1)  # the window starting at each reused row
    # One window centred on each row (clipped at the ends), ranked by its sum, then by the
    # centre row's own score.
    starts = (torch.arange(n) - width // 2).clamp(0, n - width)
    by_own = torch.argsort(cand, descending=True, stable=True)
    order = by_own[torch.argsort(sums[starts[by_own]], descending=True, stable=True)]
    taken = torch.zeros(n, dtype=torch.bool)
    left = num_selected
    for start in starts[order].tolist():
        if left == 0:
            break
        if taken[start:start + width].any():
            continue
        best = torch.argsort(cand[start:start + width], descending=True, stable=True)[:left]
        taken[start + best] = True
        left -= best.numel()
    if left:  # overlaps left rows over: the best remaining rows, one by one
        rest = torch.nonzero(~taken).flatten()
        taken[rest[torch.argsort(cand[rest], descending=True, stable=True)[:left]]] = True
    top = reused[taken.to(reused.device)]
    return torch.sort(torch.cat([top, forced])).values
