"""Question attention: recompute the reused tokens the question reads most.

The suffix (the question) is the only part of the prompt whose rows are computed at every
layer, and the answer is generated from it, so a reused token matters in proportion to how much
the question attends to it. The score is that attention mass at the selection layer, computed
from the suffix's queries over every key the suffix sees (causal, GQA-aware; :mod:`._attention`).

Two rules, differing only in the keys of the reused rows:

* ``question_attention`` scores against the rows' *fresh* keys. Through the check layer every
  row is computed, so at the first selection these are the full prefill's keys: the question's
  true attention.
* ``question_attention_cached`` scores against their *cached* (standalone, realigned) keys:
  where the question would look if the cache were reused, which is where reuse does its harm.

Both are kept: in the sweep (``docs/results/selector_sweep.md``) cached keys came out slightly
ahead at every budget, not enough to drop the other. Neither is the default: V deviation did
better on the same items. On SmolLM2-135M the question's attention at layer 1 is mostly local
(the end of the last passage) and on punctuation, while V deviation picks the first tokens of
each chunk, whose context changed most. At check layer 0 the two rules coincide (layer-0 KV
depends only on the token and its position), and there they are the only informative rules, for
fewer computed rows than a layer-1 check.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from sglang_cacheblend.blend.rules._attention import suffix_attention_mass
from sglang_cacheblend.blend.selection import Selector

if TYPE_CHECKING:
    import torch

    from sglang_cacheblend.blend.selection import SelectionInputs

__all__ = ["QuestionAttentionCachedSelector", "QuestionAttentionSelector"]


class QuestionAttentionSelector(Selector):
    """Score = ``sum over (query heads, suffix rows) of softmax(q_suffix . k_fresh)`` per row.

    Needs ``suffix_q`` (``ValueError`` otherwise); reads ``context_k`` and ``positions`` when
    given. Float32.
    """

    name = "question_attention"
    reads_suffix = True

    def score(self, inputs: SelectionInputs) -> torch.Tensor:
        return suffix_attention_mass(inputs, cached=False, rule=self.name)


class QuestionAttentionCachedSelector(Selector):
    """Score = ``sum over (query heads, suffix rows) of softmax(q_suffix . k_cached)`` per row,
    with ``k_cached`` the reused rows' cached keys (fresh keys for rows without cache)."""

    name = "question_attention_cached"
    reads_suffix = True

    def score(self, inputs: SelectionInputs) -> torch.Tensor:
        return suffix_attention_mass(inputs, cached=True, rule=self.name)
