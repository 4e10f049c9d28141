"""Question lookahead: recompute the reused tokens the question will read in the deep layers.

The rules that look only at the check layer (V/K deviation, question attention at layer 1) guess
which rows matter later from what they see early. This rule looks: right after the check layer
the suffix is run alone through every later layer on the cached KV (:mod:`..lookahead`, about 1%
of a prefill's rows), and a reused row scores the attention mass the question puts on it in the
second half of the layers. Those are the rows whose stale KV the answer would read most, which
is where the gradient of the continuation's KL puts most of the damage of reuse on SmolLM2 (see
:mod:`..lookahead`).

No public system selects this way: CacheBlend scores V deviation, LMCache K deviation, others
the question's attention at the layer where they select.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from sglang_cacheblend.blend.selection import Selector

if TYPE_CHECKING:
    import torch

    from sglang_cacheblend.blend.selection import SelectionInputs

__all__ = ["QuestionLookaheadSelector"]


class QuestionLookaheadSelector(Selector):
    """Score = the suffix's attention mass on the row, summed over query heads, suffix rows and
    the layers ``lookahead_first_layer(num_layers) .. num_layers - 1`` of ``lookahead_mass``
    (float32), the second half of the layers.

    Needs ``lookahead_mass`` (``ValueError`` otherwise), which the forward loop fills because
    :attr:`reads_lookahead` is set.
    """

    name = "question_lookahead"
    reads_lookahead = True

    def lookahead_first_layer(self, num_layers: int) -> int:
        """The second half of the layers: the one place this rule's window is declared."""
        return num_layers // 2

    def score(self, inputs: SelectionInputs) -> torch.Tensor:
        mass = inputs.lookahead_mass
        if mass is None:
            raise ValueError(
                f"selector {self.name!r} needs SelectionInputs.lookahead_mass (the suffix run "
                "ahead through the later layers); none was given"
            )
        return mass[self.lookahead_first_layer(mass.shape[0]):].sum(dim=0)
