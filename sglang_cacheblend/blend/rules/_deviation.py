"""Squared-L2 deviation per row, the arithmetic shared by the K and V deviation rules."""

from __future__ import annotations

import torch

__all__ = ["squared_deviation"]


def squared_deviation(fresh: torch.Tensor, cached: torch.Tensor) -> torch.Tensor:
    """Sum over heads and head dims of ``(fresh - cached) ** 2``, in float32.

    Parameters
    ----------
    fresh, cached : torch.Tensor
        Shape ``(num_rows, num_kv_heads, head_dim)``, same dtype and device.

    Returns
    -------
    torch.Tensor
        Shape ``(num_rows,)``, float32.
    """
    diff = fresh.float() - cached.float()
    return diff.square().sum(dim=(1, 2))
