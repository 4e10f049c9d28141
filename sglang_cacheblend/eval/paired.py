"""Is one mode better than another on the same items, or is the difference noise?

A table of means over 30 or 100 items cannot say that by itself: the gap a mode recovers is a
ratio of means dominated by a few items with a large reuse KL, and modes are scored on the
same prompts, so their errors are paired. :func:`paired_gap` compares two modes item by item:
on how many items the first has the lower KL, the difference of their gaps recovered, and a
percentile-bootstrap interval of that difference over items (scipy's, with a fixed seed, so a
report is reproducible).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np


@dataclass(frozen=True)
class PairedGap:
    """``a`` against ``b`` on the ``items`` both were scored on (and reuse, the baseline).

    ``difference`` is ``gap(a) - gap(b)``, in the same units as the gap (0.1 = 10 points);
    ``low`` / ``high`` bound its ``confidence`` bootstrap interval; ``wins`` counts the items
    where ``a``'s KL is strictly lower, ``losses`` where it is strictly higher.
    """

    a: str
    b: str
    items: int
    wins: int
    losses: int
    difference: float
    low: float
    high: float
    confidence: float

    @property
    def separated(self) -> bool:
        """Whether the interval excludes 0 (``a`` better: > 0; worse: < 0)."""
        return self.low > 0 or self.high < 0


def paired_gap(rows: Iterable[Mapping[str, Any]], a: str, b: str, *, reuse: str = "reuse",
               resamples: int = 2000, confidence: float = 0.95, seed: int = 0) -> PairedGap:
    """Compare modes ``a`` and ``b`` on the items where both and ``reuse`` were scored.

    The gap of a mode on a set of items is ``1 - sum KL(mode) / sum KL(reuse)`` (as in the
    report's table), so the difference is ``(sum KL(b) - sum KL(a)) / sum KL(reuse)``; the
    interval is scipy's paired percentile bootstrap of that statistic over items. Raises
    ``ValueError`` when the modes share no item or reuse has no gap on them.
    """
    from scipy.stats import bootstrap

    kl: dict[str, dict[int, float]] = {a: {}, b: {}, reuse: {}}
    for row in rows:
        if row["mode"] in kl:
            kl[row["mode"]][int(row["item"])] = float(row["kl"])
    items = sorted(set(kl[a]) & set(kl[b]) & set(kl[reuse]))
    if not items:
        raise ValueError(f"modes {a!r}, {b!r} and {reuse!r} share no scored item")
    ka, kb, kr = (np.array([kl[mode][i] for i in items]) for mode in (a, b, reuse))
    if not kr.sum() > 0:
        raise ValueError(f"{reuse!r} has no KL gap on the {len(items)} shared items")
    if len(items) > 1:
        with np.errstate(invalid="ignore", divide="ignore"):  # a resample without a gap: NaN
            interval = bootstrap((ka, kb, kr), _difference, paired=True, vectorized=True,
                                 n_resamples=resamples, confidence_level=confidence,
                                 method="percentile", rng=seed).confidence_interval
        low, high = float(interval.low), float(interval.high)
    else:
        low = high = math.nan
    return PairedGap(
        a=a, b=b, items=len(items),
        wins=int((ka < kb).sum()), losses=int((ka > kb).sum()),
        difference=float(_difference(ka, kb, kr)), low=low, high=high, confidence=confidence,
    )


def _difference(ka: np.ndarray, kb: np.ndarray, kr: np.ndarray, axis: int = -1) -> np.ndarray:
    """``gap(a) - gap(b)`` from per-item KLs of a, b and reuse (along ``axis``)."""
    return (kb.sum(axis) - ka.sum(axis)) / kr.sum(axis)
