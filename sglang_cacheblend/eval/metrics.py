"""Scores for the evaluation: answer F1 and exact match, KL between next-token distributions.

Answer scores follow the SQuAD evaluation (lowercase, drop punctuation and the articles
a/an/the, collapse whitespace; token F1 over the bag of tokens), which is what the CacheBlend
paper reports for MuSiQue. A prediction is scored against each gold answer and the best is kept.

Fidelity to full prefill is measured as KL(full || method) of next-token distributions. A server
returns log-probs for a chosen set of token ids, not the whole vocabulary, so :func:`coarse_kl`
computes the KL exactly on the coarsening ``S ∪ {rest}`` of the vocabulary. That is a lower
bound of the full-vocabulary KL (merging outcomes never increases KL, by the log-sum
inequality), and equal to it when S holds all the mass of both distributions.

Pure Python (``math``, ``statistics``); no torch, no server.
"""

from __future__ import annotations

import math
import re
import statistics
import string
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from typing import NamedTuple

REST_EPS = 1e-12
"""Floor of the rest mass in :func:`coarse_kl`: log-probs summed over S may reach or pass 1 by
rounding (bf16 logits), and the rest bucket must stay a valid, non-zero probability."""

_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCTUATION = frozenset(string.punctuation)


# ------------------------------------------------------------------------------ answers


def normalize_answer(text: str) -> str:
    """SQuAD normalisation: lowercase, no punctuation, no articles, single spaces."""
    text = "".join(ch for ch in text.lower() if ch not in _PUNCTUATION)
    text = _ARTICLES.sub(" ", text)
    return " ".join(text.split())


def token_f1(prediction: str, gold: str) -> float:
    """Token F1 of one prediction against one gold answer, after :func:`normalize_answer`.

    Both empty after normalisation scores 1.0; exactly one empty scores 0.0.
    """
    pred_tokens = normalize_answer(prediction).split()
    gold_tokens = normalize_answer(gold).split()
    if not pred_tokens or not gold_tokens:
        return float(pred_tokens == gold_tokens)
    common = sum((Counter(pred_tokens) & Counter(gold_tokens)).values())
    if common == 0:
        return 0.0
    precision = common / len(pred_tokens)
    recall = common / len(gold_tokens)
    return 2 * precision * recall / (precision + recall)


def exact_match(prediction: str, gold: str) -> float:
    """1.0 when prediction and gold are equal after :func:`normalize_answer`, else 0.0."""
    return float(normalize_answer(prediction) == normalize_answer(gold))


def best_f1(prediction: str, golds: Sequence[str]) -> float:
    """The best :func:`token_f1` over the gold answers (MuSiQue items list aliases)."""
    return max(token_f1(prediction, gold) for gold in _nonempty(golds))


def best_exact_match(prediction: str, golds: Sequence[str]) -> float:
    """The best :func:`exact_match` over the gold answers."""
    return max(exact_match(prediction, gold) for gold in _nonempty(golds))


def _nonempty(golds: Sequence[str]) -> Sequence[str]:
    if isinstance(golds, str):
        raise ValueError("golds must be a list of answers, got a single str")
    if not golds:
        raise ValueError("golds must hold at least one answer")
    return golds


# ------------------------------------------------------------------------------ KL


def coarse_kl(
    p_logprobs: Mapping[int, float], q_logprobs: Mapping[int, float], *, eps: float = REST_EPS
) -> float:
    """KL(p || q) in nats on the coarsening ``S ∪ {rest}`` of the vocabulary.

    Parameters
    ----------
    p_logprobs, q_logprobs
        Natural-log probabilities of the same next-token position under p (e.g. full prefill)
        and q (e.g. a blended prefill), keyed by token id. S is the set of ids present in both;
        an id known on one side only falls into the rest bucket.
    eps
        Floor of each rest mass ``1 - sum(exp(logprob) over S)``.

    Returns
    -------
    float
        ``sum_{i in S} p_i (log p_i - log q_i) + p_rest (log p_rest - log q_rest)``. This is a
        lower bound of the full-vocabulary KL, equal to it when S holds all the mass of p and q
        (then both rest masses are ~0). ``inf`` when q gives 0 to a token of S that p does not.

    Raises ``ValueError`` when S is empty, or a log-prob is NaN or clearly above 0.
    """
    support = [token for token in p_logprobs if token in q_logprobs]
    if not support:
        raise ValueError("coarse_kl needs at least one token id present in both distributions")
    kl = 0.0
    p_mass = q_mass = 0.0
    for token in support:
        lp = _checked_logprob(p_logprobs[token], "p", token)
        lq = _checked_logprob(q_logprobs[token], "q", token)
        p_mass += math.exp(lp)
        q_mass += math.exp(lq)
        kl += _kl_term(lp, lq)
    lp_rest = math.log(max(1.0 - p_mass, eps))
    lq_rest = math.log(max(1.0 - q_mass, eps))
    return kl + _kl_term(lp_rest, lq_rest)


def _checked_logprob(value: float, side: str, token: int) -> float:
    value = float(value)
    if math.isnan(value) or value > 1e-3:
        raise ValueError(f"{side} log-prob of token {token} must be <= 0, got {value}")
    return min(value, 0.0)


def _kl_term(lp: float, lq: float) -> float:
    """``p (log p - log q)`` with the conventions 0 log 0 = 0 and p log(p / 0) = inf."""
    if lp == -math.inf:
        return 0.0
    if lq == -math.inf:
        return math.inf
    return math.exp(lp) * (lp - lq)


def mean_coarse_kl(
    p_positions: Sequence[Mapping[int, float]], q_positions: Sequence[Mapping[int, float]]
) -> float:
    """Mean of :func:`coarse_kl` over aligned positions (e.g. a teacher-forced continuation).

    Raises ``ValueError`` when the sequences differ in length or are empty.
    """
    if len(p_positions) != len(q_positions):
        raise ValueError(
            f"p has {len(p_positions)} positions and q has {len(q_positions)}; they must align"
        )
    return mean_over_positions(coarse_kl(p, q) for p, q in zip(p_positions, q_positions))


def mean_over_positions(values: Iterable[float]) -> float:
    """Mean of per-position values; ``ValueError`` when there are none."""
    values = list(values)
    if not values:
        raise ValueError("no positions to average over")
    return math.fsum(values) / len(values)


def gap_recovered(kl_reuse: float, kl_mode: float) -> float:
    """Share of the reuse-to-full-prefill KL gap that a mode closes: ``1 - kl_mode / kl_reuse``.

    Full prefill has KL 0 against itself and plain reuse (ratio 0) has ``kl_reuse``, so 1.0 means
    the mode matches full prefill, 0.0 no better than reuse, below 0 worse than reuse. Raises
    ``ValueError`` when ``kl_reuse <= 0`` (there is no gap to recover).
    """
    if not kl_reuse > 0:
        raise ValueError(f"kl_reuse must be > 0 to define a gap, got {kl_reuse}")
    return 1.0 - kl_mode / kl_reuse


# ------------------------------------------------------------------------------ summaries


class Summary(NamedTuple):
    """Summary statistics of a list of values."""

    n: int
    mean: float
    median: float
    min: float
    max: float


def summarize(values: Iterable[float]) -> Summary:
    """n, mean, median, min and max of ``values``; ``ValueError`` when there are none."""
    values = [float(v) for v in values]
    if not values:
        raise ValueError("cannot summarize an empty list")
    return Summary(
        n=len(values),
        mean=math.fsum(values) / len(values),
        median=statistics.median(values),
        min=min(values),
        max=max(values),
    )
