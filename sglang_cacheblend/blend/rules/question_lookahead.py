"""Question lookahead: recompute the reused tokens the question will read in the deep layers.

The rules that look only at the check layer (V/K deviation, question attention at layer 1) guess
which rows matter later from what they see early. This rule looks: right after the check layer
the suffix is run alone through every later layer on the cached KV (:mod:`..lookahead`, about 1%
of a prefill's rows), and a reused row scores the attention mass the question puts on it in the
second half of the layers. Those are the rows whose stale KV the answer would read most, where
(measured on SmolLM2 with the gradient of the continuation's KL) most of the damage of reuse is.

No public system selects this way: CacheBlend scores V deviation, LMCache K deviation, others
the question's attention at the layer where they select.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from sglang_cacheblend.blend.base import Selector

if TYPE_CHECKING:
    import torch

    from sglang_cacheblend.blend.base import SelectionInputs

__all__ = ["QuestionLookaheadSelector"]


class QuestionLookaheadSelector(Selector):
    """Score = the suffix's attention mass on the row, summed over query heads, suffix rows and
    the layers ``num_layers // 2 .. num_layers - 1`` of ``lookahead_mass`` (float32).

    Needs ``lookahead_mass`` (``ValueError`` otherwise), which the forward loop fills because
    :attr:`reads_lookahead` is set.
    """

    name = "question_lookahead"
    reads_lookahead = True

    def lookahead_first_layer(self, num_layers: int) -> int:
        return num_layers // 2

    def score(self, inputs: SelectionInputs) -> torch.Tensor:
        mass = inputs.lookahead_mass
        if mass is None:
            raise ValueError(
                f"selector {self.name!r} needs SelectionInputs.lookahead_mass (the suffix run "
                "ahead through the later layers); none was given"
            )
        return mass[mass.shape[0] // 2:].sum(dim=0)
