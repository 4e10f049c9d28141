"""The selector registry: rule name -> class, built explicitly here (no import-time hooks).

``BlendConfig.selector`` names a key of :data:`SELECTORS`; the names themselves are
:data:`sglang_cacheblend.config.SELECTOR_NAMES`, so the config validates without importing torch
or the rules, and this module refuses to import when the two lists drift apart. To add a rule,
write one module under ``rules/`` with a :class:`~sglang_cacheblend.blend.selection.Selector`
subclass, list it here, and add its name to ``SELECTOR_NAMES``.
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
from sglang_cacheblend.config import SELECTOR_NAMES

if TYPE_CHECKING:
    from collections.abc import Mapping

    from sglang_cacheblend.blend.selection import Selector

__all__ = ["SELECTORS", "build_selector"]

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
if tuple(SELECTORS) != SELECTOR_NAMES:
    raise RuntimeError(
        f"the registry's rules {tuple(SELECTORS)} differ from config.SELECTOR_NAMES "
        f"{SELECTOR_NAMES}; list every rule in both, in the same order"
    )


def build_selector(name: str) -> Selector:
    """A new selector instance for rule ``name``; ValueError if the name is unknown."""
    try:
        cls = SELECTORS[name]
    except KeyError:
        raise ValueError(f"unknown selector {name!r}; known: {sorted(SELECTORS)}") from None
    return cls()
