"""V deviation: the original CacheBlend rule (YaoJiayi/CacheBlend, layer-1 check).

A reused token whose fresh value vector differs most from its cached one is the token whose
cached KV misses the most cross-chunk attention. V carries no RoPE, so no realignment is
involved in this score.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from sglang_cacheblend.blend.rules._deviation import squared_deviation
from sglang_cacheblend.blend.selection import Selector

if TYPE_CHECKING:
    import torch

    from sglang_cacheblend.blend.selection import SelectionInputs

__all__ = ["VDeviationSelector"]


class VDeviationSelector(Selector):
    """Score = ``sum over (kv_heads, head_dim) of (fresh_v - cached_v) ** 2`` per row (float32)."""

    name = "v_deviation"

    def score(self, inputs: SelectionInputs) -> torch.Tensor:
        return squared_deviation(inputs.fresh_v, inputs.cached_v)
