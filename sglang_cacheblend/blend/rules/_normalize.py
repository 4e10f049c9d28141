"""Putting two scores on one scale before combining them: ranks among the reused rows."""

from __future__ import annotations

import torch

__all__ = ["rank_normalized"]


def rank_normalized(scores: torch.Tensor, reuse_mask: torch.Tensor) -> torch.Tensor:
    """Rank of each reused row's score among the reused rows, mapped to ``(0, 1]`` (1 = highest).

    Ties get distinct ranks, the earlier row ranking lower, so the result is deterministic.
    Rows with ``reuse_mask`` False get 0. Robust to the heavy tails of attention mass, where one
    sink token would squash every other row under max normalisation (dividing by the maximum).

    Parameters
    ----------
    scores : torch.Tensor
        ``(num_rows,)`` float.
    reuse_mask : torch.Tensor
        ``(num_rows,)`` bool.

    Returns
    -------
    torch.Tensor
        ``(num_rows,)`` float32.
    """
    out = torch.zeros(scores.shape[0], dtype=torch.float32, device=scores.device)
    reused = torch.nonzero(reuse_mask).flatten()
    if reused.numel() == 0:
        return out
    order = torch.argsort(scores[reused].float(), stable=True)
    ranks = torch.empty_like(order)
    ranks[order] = torch.arange(1, order.numel() + 1, device=order.device)
    out[reused] = ranks.float() / reused.numel()
    return out

