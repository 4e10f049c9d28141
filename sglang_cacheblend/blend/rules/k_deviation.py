"""K deviation: LMCache's rule (``lmcache/v1/compute/blend``).

Compares fresh K with cached K after the cached K has been RoPE-realigned to the row's new
position, so the score measures content drift, not the position shift.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from sglang_cacheblend.blend.rules._deviation import squared_deviation
from sglang_cacheblend.blend.selection import Selector

if TYPE_CHECKING:
    import torch

    from sglang_cacheblend.blend.selection import SelectionInputs

__all__ = ["KDeviationSelector"]


class KDeviationSelector(Selector):
    """Score = ``sum over (kv_heads, head_dim) of (fresh_k - cached_k) ** 2`` per row (float32).

    ``cached_k`` must already be realigned to the rows' new positions.
    """

    name = "k_deviation"

    def score(self, inputs: SelectionInputs) -> torch.Tensor:
        return squared_deviation(inputs.fresh_k, inputs.cached_k)
