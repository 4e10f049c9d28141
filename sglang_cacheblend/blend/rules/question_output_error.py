"""Question output error: recompute the tokens whose stale KV moves the question's output most.

Not used by any public system (the original CacheBlend scores V deviation, LMCache K
deviation, others attention alone). At a selection layer the suffix's attention output is
``o_sh = sum_j p_sh(j) v_j``. Reusing token ``j`` replaces its term ``p_sh(j) v_j`` (fresh keys
and values) by ``p'_sh(j) v'_j`` (cached ones), so the score is the size of that swap, summed
over the suffix rows ``s`` and query heads ``h``::

    score_j = sum_{s,h} || p_sh(j) v_j - p'_sh(j) v'_j ||_2

It is zero for tokens whose cache is exact (an exactly cached prefix), small for stale tokens
the question ignores, and large for tokens the question reads under either KV. Both ``p`` and
``p'`` are normalised over every key the suffix sees (:mod:`._attention`).

At check layer 0 fresh and cached KV coincide and every score is ~0 (rounding noise): use it at
layer >= 1 (or in a gradual schedule, whose later steps see real deviations).

In the sweep it closed less of the KL gap than V deviation with one check at layer 1, and more
with gradual filtering from layer 0 (``docs/results/selector_sweep.md``): the question's own
attention output is not what the continuation's KL is most sensitive to on this model.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from sglang_cacheblend.blend.rules._attention import row_keys, suffix_attention_blocks
from sglang_cacheblend.blend.selection import Selector

if TYPE_CHECKING:
    from sglang_cacheblend.blend.selection import SelectionInputs

__all__ = ["QuestionOutputErrorSelector"]


class QuestionOutputErrorSelector(Selector):
    """Score = ``sum over (suffix rows, query heads) of ||p v - p' v'||`` per row (float32).

    Needs ``suffix_q`` (``ValueError`` otherwise).
    """

    name = "question_output_error"
    reads_suffix = True

    def score(self, inputs: SelectionInputs) -> torch.Tensor:
        fresh_v, cached_v = inputs.fresh_v.float(), inputs.cached_v.float()
        cached_v = torch.where(inputs.reuse_mask[:, None, None], cached_v, fresh_v)
        # ||p v - p' v'||^2 = p^2 |v|^2 - 2 p p' <v, v'> + p'^2 |v'|^2, per (kv head, row)
        vv = fresh_v.square().sum(-1).T[:, None, None, :]  # (kv_heads, 1, 1, num_rows)
        cc = cached_v.square().sum(-1).T[:, None, None, :]
        vc = (fresh_v * cached_v).sum(-1).T[:, None, None, :]
        blocks = zip(
            suffix_attention_blocks(inputs, row_keys(inputs, cached=False), self.name),
            suffix_attention_blocks(inputs, row_keys(inputs, cached=True), self.name),
        )
        total = torch.zeros(inputs.num_rows, dtype=torch.float32, device=fresh_v.device)
        for p, p_cached in blocks:
            sq = p.square() * vv - 2 * p * p_cached * vc + p_cached.square() * cc
            total += sq.clamp_min(0).sqrt().sum(dim=(0, 1, 2))
        return total
