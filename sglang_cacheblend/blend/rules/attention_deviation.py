"""Question attention combined with KV deviation: tokens the question reads AND whose cache is stale.

Each signal alone has a blind spot. Deviation ranks tokens whose cached KV drifted, whether or
not anything downstream reads them; question attention ranks tokens the question reads, whether
or not their cache is wrong (an exactly cached prefix, the attention sink). The product of the
two is the first-order size of the question's attention-output error that each token's stale
KV causes; a sum of normalised scores is the softer alternative that keeps tokens high on one
signal only. Two combinations are registered: the product with V deviation, and the rank sum
with K deviation. Ranks, not max-normalised values, because attention mass is heavy-tailed
(:mod:`._normalize`).

In the sweep both closed less of the KL gap than V deviation alone with one check at layer 1, the
rank sum doing better with gradual filtering from layer 1 (``docs/results/selector_sweep.md``):
the attention factor pulls the choice toward the question's local, mostly harmless reads.

At check layer 0 the deviation is ~0 for every row (layer-0 KV depends only on the token and
its position), so these rules then degrade to rounding noise; select at layer >= 1 with them.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, ClassVar

from sglang_cacheblend.blend.rules._attention import suffix_attention_mass
from sglang_cacheblend.blend.rules._deviation import squared_deviation
from sglang_cacheblend.blend.rules._normalize import rank_normalized
from sglang_cacheblend.blend.selection import Selector

if TYPE_CHECKING:
    import torch

    from sglang_cacheblend.blend.selection import SelectionInputs

__all__ = ["AttentionDeviationSelector", "AttentionKDeviationRankSum", "AttentionVDeviationProduct"]


class AttentionDeviationSelector(Selector):
    """Base of the combined rules: ``deviation`` is ``"k"`` or ``"v"``; ``combine`` is
    ``"product"`` (attention x deviation norm) or ``"rank_sum"`` (sum of the two ranks among the
    reused rows, :func:`._normalize.rank_normalized`). Needs ``suffix_q``."""

    reads_suffix = True
    deviation: ClassVar[str]
    combine: ClassVar[str]

    def score(self, inputs: SelectionInputs) -> torch.Tensor:
        attention = suffix_attention_mass(inputs, cached=False, rule=self.name)
        if self.deviation == "k":
            deviation = squared_deviation(inputs.fresh_k, inputs.cached_k)
        else:
            deviation = squared_deviation(inputs.fresh_v, inputs.cached_v)
        if self.combine == "product":
            return attention * deviation.sqrt()
        mask = inputs.reuse_mask
        return rank_normalized(attention, mask) + rank_normalized(deviation, mask)


class AttentionVDeviationProduct(AttentionDeviationSelector):
    """Score = question attention mass x ``||fresh_v - cached_v||`` per row."""

    name = "attention_x_v_deviation"
    deviation = "v"
    combine = "product"


class AttentionKDeviationRankSum(AttentionDeviationSelector):
    """Score = rank(question attention) + rank(K deviation), both over the reused rows."""

    name = "attention_plus_k_deviation"
    deviation = "k"
    combine = "rank_sum"
