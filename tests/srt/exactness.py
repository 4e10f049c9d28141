"""What the exactness checks of chunk variants read from a ``/generate`` answer."""

from __future__ import annotations

from typing import Any


def output_logprobs(out: dict[str, Any]) -> list[float]:
    """The log-probability of each generated token (``return_logprob`` must be set)."""
    return [lp for lp, *_ in out["meta_info"]["output_token_logprobs"]]


def cacheblend_report(out: dict[str, Any]) -> dict[str, Any]:
    """The request's one ``meta_info["cacheblend"]`` report."""
    (report,) = out["meta_info"]["cacheblend"]
    return report


def max_abs_diff(a: list[float], b: list[float]) -> float:
    return max(abs(x - y) for x, y in zip(a, b, strict=True))
