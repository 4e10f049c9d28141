"""The selector registry: rule name -> class, built explicitly here (no import-time hooks).

``BlendConfig.selector`` names a key of :data:`SELECTORS`. To add a rule, write one module under
``rules/`` with a :class:`~sglang_cacheblend.blend.base.Selector` subclass and list it here.
"""

from __future__ import annotations

from types import MappingProxyType
from typing import TYPE_CHECKING

from sglang_cacheblend.blend.rules.attention_deviation import (
    AttentionKDeviationRankSum,
    AttentionVDeviationProduct,
)
from sglang_cacheblend.blend.rules.k_deviation import KDeviationSelector
from sglang_cacheblend.blend.rules.question_attention import (
    QuestionAttentionCachedSelector,
    QuestionAttentionSelector,
)
from sglang_cacheblend.blend.rules.question_lookahead import QuestionLookaheadSelector
from sglang_cacheblend.blend.rules.question_output_error import QuestionOutputErrorSelector
from sglang_cacheblend.blend.rules.v_deviation import VDeviationSelector

if TYPE_CHECKING:
    from collections.abc import Mapping

    from sglang_cacheblend.blend.base import Selector

__all__ = ["SELECTORS", "build_selector", "selector_names"]

SELECTORS: Mapping[str, type[Selector]] = MappingProxyType(
    {
        cls.name: cls
        for cls in (
            VDeviationSelector,
            KDeviationSelector,
            QuestionAttentionSelector,
            QuestionAttentionCachedSelector,
            AttentionVDeviationProduct,
            AttentionKDeviationRankSum,
            QuestionOutputErrorSelector,
            QuestionLookaheadSelector,
        )
    }
)


def selector_names() -> frozenset[str]:
    """Names accepted by ``BlendConfig.selector``."""
    return frozenset(SELECTORS)


def build_selector(name: str) -> Selector:
    """A new selector instance for rule ``name``; ValueError if the name is unknown."""
    try:
        cls = SELECTORS[name]
    except KeyError:
        raise ValueError(f"unknown selector {name!r}; known: {sorted(SELECTORS)}") from None
    return cls()
