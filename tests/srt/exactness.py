"""What the chunk-variant server tests read: a ``/generate`` answer, and the server's state."""

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


def agrees_within(out: dict[str, Any], reference: dict[str, Any], tol: float) -> bool:
    """Whether ``out`` starts with ``reference``'s greedy token, and their log-probs stay within
    ``tol`` while their greedy tokens agree (after the first token they part on, log-probs are
    of other tokens and say nothing)."""
    agreed = 0
    for token, expected in zip(out["output_ids"], reference["output_ids"]):
        if token != expected:
            break
        agreed += 1
    return agreed > 0 and max_abs_diff(output_logprobs(out)[:agreed],
                                       output_logprobs(reference)[:agreed]) < tol


def assert_nothing_held(base_url: str) -> None:
    """Every KV slot is free, evictable or protected, none protected, no chunk locked."""
    import requests

    info = requests.get(base_url + "/server_info", timeout=60).json()
    state = info["internal_states"][0]["cacheblend"]
    pool = state["token_pool"]
    assert pool["available"] + pool["evictable"] + pool["protected"] == pool["total"]
    assert pool["protected"] == 0 and state["chunk_index"]["locked_size"] == 0
