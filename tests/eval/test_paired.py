"""Paired comparison of two modes over the same items: counts, the gap difference, and an
interval that separates a real difference from noise."""

from __future__ import annotations

import random

import pytest

from sglang_cacheblend.eval.paired import paired_gap
from sglang_cacheblend.eval.quality.report import summarize_modes


def _rows(kls: dict[str, list[float]]) -> list[dict]:
    return [{"item": i, "mode": mode, "kl": kl, "logprob": 0.0, "answer_matches_full": True,
             "f1_vs_full": 1.0, "dataset_f1": 0.0, "recomputed_fraction": 0.2}
            for mode, values in kls.items() for i, kl in enumerate(values)]


def test_the_difference_is_the_difference_of_the_tables_gaps():
    rows = _rows({"reuse": [0.4, 0.2, 0.6], "a": [0.1, 0.1, 0.3], "b": [0.2, 0.15, 0.5]})
    summary = summarize_modes(rows)
    pair = paired_gap(rows, "a", "b")
    assert pair.difference == pytest.approx(summary["a"]["gap_recovered"]
                                            - summary["b"]["gap_recovered"])
    assert (pair.items, pair.wins, pair.losses) == (3, 3, 0)
    assert pair.low <= pair.difference <= pair.high


def test_a_consistent_win_is_separated_and_noise_is_not():
    rng = random.Random(1)
    reuse = [rng.uniform(0.05, 0.3) for _ in range(40)]
    better = [r * rng.uniform(0.3, 0.5) for r in reuse]
    worse = [r * rng.uniform(0.6, 0.8) for r in reuse]
    noisy = [r * rng.uniform(0.2, 1.0) for r in reuse]
    noisy_too = [r * rng.uniform(0.2, 1.0) for r in reuse]
    rows = _rows({"reuse": reuse, "better": better, "worse": worse, "n1": noisy, "n2": noisy_too})
    win = paired_gap(rows, "better", "worse")
    assert win.separated and win.low > 0 and win.wins == 40
    assert paired_gap(rows, "worse", "better").high < 0
    assert not paired_gap(rows, "n1", "n2").separated
    assert paired_gap(rows, "better", "worse") == win  # a fixed seed: the same report twice


def test_only_items_both_modes_and_reuse_were_scored_on_count():
    rows = _rows({"reuse": [0.4, 0.2, 0.6], "a": [0.1, 0.1], "b": [0.2, 0.15, 0.5]})
    assert paired_gap(rows, "a", "b").items == 2


@pytest.mark.parametrize("kls, message", [
    ({"reuse": [0.1], "a": [0.1]}, "share no scored item"),
    ({"reuse": [0.0, 0.0], "a": [0.1, 0.0], "b": [0.0, 0.0]}, "no KL gap"),
])
def test_nothing_to_compare_is_an_error_that_says_why(kls, message):
    with pytest.raises(ValueError, match=message):
        paired_gap(_rows(kls), "a", "b")
