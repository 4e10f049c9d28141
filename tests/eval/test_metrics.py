"""Answer scores and KL on known inputs; coarse KL is exact on the full support, else a bound."""

from __future__ import annotations

import math
import random

import pytest

from sglang_cacheblend.eval.metrics import (
    best_exact_match,
    best_f1,
    coarse_kl,
    exact_match,
    gap_recovered,
    mean_coarse_kl,
    mean_over_positions,
    normalize_answer,
    summarize,
    token_f1,
)


def test_normalize_answer_follows_squad():
    assert normalize_answer("The  Exeter, College!") == "exeter college"
    assert normalize_answer("An apple a day") == "apple day"


@pytest.mark.parametrize(
    ("prediction", "gold", "f1"),
    [
        ("Exeter College", "Exeter College", 1.0),
        ("the Exeter College", "Exeter College.", 1.0),
        ("Exeter", "Exeter College", 2 * (1.0 * 0.5) / 1.5),
        ("he studied at Exeter College", "Exeter College", 2 * (0.4 * 1.0) / 1.4),
        ("Oxford", "Exeter College", 0.0),
        ("", "", 1.0),
        ("the", "Exeter", 0.0),
    ],
)
def test_token_f1_of_known_pairs(prediction: str, gold: str, f1: float):
    assert token_f1(prediction, gold) == pytest.approx(f1)


def test_best_scores_take_the_max_over_gold_answers():
    golds = ["Exeter College", "Exeter"]
    assert best_f1("Exeter", golds) == 1.0
    assert best_exact_match("exeter college.", golds) == 1.0
    assert exact_match("Exeter", "Exeter College") == 0.0
    with pytest.raises(ValueError, match="at least one"):
        best_f1("x", [])
    with pytest.raises(ValueError, match="single str"):
        best_f1("x", "Exeter")


def _random_logprobs(rng: random.Random, vocab: int) -> dict[int, float]:
    weights = [rng.random() ** 3 for _ in range(vocab)]
    total = sum(weights)
    return {i: math.log(w / total) for i, w in enumerate(weights)}


def _full_kl(p: dict[int, float], q: dict[int, float]) -> float:
    return sum(math.exp(p[i]) * (p[i] - q[i]) for i in p)


def test_coarse_kl_equals_exact_kl_on_the_full_support():
    rng = random.Random(0)
    for _ in range(20):
        p, q = _random_logprobs(rng, 50), _random_logprobs(rng, 50)
        assert coarse_kl(p, q) == pytest.approx(_full_kl(p, q), rel=1e-9, abs=1e-9)
    assert coarse_kl(p, p) == pytest.approx(0.0, abs=1e-12)


def test_coarse_kl_is_a_lower_bound_on_any_subset():
    rng = random.Random(1)
    for _ in range(200):
        p, q = _random_logprobs(rng, 40), _random_logprobs(rng, 40)
        subset = rng.sample(range(40), rng.randint(1, 39))
        coarse = coarse_kl({i: p[i] for i in subset}, {i: q[i] for i in subset})
        assert 0.0 <= coarse <= _full_kl(p, q) + 1e-12


def test_coarse_kl_of_a_known_two_bucket_case():
    # S = {7}: p(7) = 0.5, q(7) = 0.25; rest 0.5 vs 0.75.
    expected = 0.5 * math.log(0.5 / 0.25) + 0.5 * math.log(0.5 / 0.75)
    assert coarse_kl({7: math.log(0.5)}, {7: math.log(0.25)}) == pytest.approx(expected)


def test_coarse_kl_edge_cases():
    assert coarse_kl({1: 0.0}, {1: -math.inf}) == math.inf
    assert coarse_kl({1: -math.inf, 2: 0.0}, {1: 0.0, 2: -math.inf}) == math.inf
    with pytest.raises(ValueError, match="present in both"):
        coarse_kl({1: -1.0}, {2: -1.0})
    with pytest.raises(ValueError, match="<= 0"):
        coarse_kl({1: 0.5}, {1: -1.0})


def test_mean_coarse_kl_and_positions():
    p = [{1: math.log(0.5)}, {1: math.log(0.9)}]
    q = [{1: math.log(0.5)}, {1: math.log(0.9)}]
    assert mean_coarse_kl(p, q) == pytest.approx(0.0, abs=1e-12)
    with pytest.raises(ValueError, match="align"):
        mean_coarse_kl(p, q[:1])
    assert mean_over_positions([0.1, 0.3]) == pytest.approx(0.2)
    with pytest.raises(ValueError):
        mean_over_positions([])


def test_gap_recovered():
    assert gap_recovered(0.1127, 0.1127) == 0.0
    assert gap_recovered(0.1127, 0.0) == 1.0
    assert gap_recovered(0.2, 0.15) == pytest.approx(0.25)
    assert gap_recovered(0.1, 0.2) == pytest.approx(-1.0)
    with pytest.raises(ValueError, match="kl_reuse"):
        gap_recovered(0.0, 0.0)


def test_summarize():
    s = summarize([3, 1, 2, 10])
    assert (s.n, s.mean, s.median, s.min, s.max) == (4, 4.0, 2.5, 1.0, 10.0)
    with pytest.raises(ValueError):
        summarize([])
