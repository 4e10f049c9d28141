"""Context-conditioned chunk KV through a real server (``--cacheblend-chunk-context``).

The exactness check: a chunk placed in a prompt right after ``BOS + context`` sits exactly
where its context-conditioned KV was computed, so reusing that KV without recomputing anything
(ratio 0) must give full prefill's own logprobs, whether the chunk was computed as a miss in
the request's forward or by a precompute request. Standalone chunk KV (``chunk_context:
"none"``) does not, which shows the check can fail.
"""

from __future__ import annotations

import random

import pytest
import requests

from sglang_cacheblend.chunks import chunk_hints, precompute_hints
from sglang_cacheblend.context_text import builtin_context
from tests.conftest import FLOAT32, running_server
from tests.srt.exactness import assert_nothing_held, cacheblend_report
from tests.srt.exactness import max_abs_diff as _max_diff
from tests.srt.exactness import output_logprobs as _logprobs

TIMEOUT = 600
CONTEXT = "builtin:1"
rng = random.Random(17)
CHUNK = [rng.randrange(1000, 40000) for _ in range(200)]
OTHER = [rng.randrange(1000, 40000) for _ in range(200)]
QUESTION = list(range(2000, 2016))
NEW_TOKENS = 6


@pytest.fixture(scope="module")
def context_ids(model_path) -> list[int]:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_path)
    return [tokenizer.bos_token_id,
            *tokenizer.encode(builtin_context(1), add_special_tokens=False)]


@pytest.fixture(scope="module")
def server(model_path, tmp_path_factory):
    # fp32: the exactness checks compare logprobs to 2e-3, which bf16 rounding alone exceeds
    # (test_served_dtype_server.py holds what bf16 promises).
    args = ["--enable-cacheblend", *FLOAT32, "--cacheblend-chunk-context", CONTEXT,
            "--cacheblend-min-reused-tokens", "16"]
    with running_server(model_path, tmp_path_factory.mktemp("chunk_context"), args) as proc:
        yield proc


def _generate(server, input_ids, *, salt, kv_hints=None, new_tokens=NEW_TOKENS):
    body = {"input_ids": input_ids, "cache_salt": salt, "return_logprob": True,
            "sampling_params": {"max_new_tokens": new_tokens, "temperature": 0}}
    if kv_hints is not None:
        body["kv_hints"] = kv_hints
    response = requests.post(server.base_url + "/generate", json=body, timeout=TIMEOUT)
    assert response.status_code == 200, response.text
    return response.json()


def _report(out) -> dict:
    report = cacheblend_report(out)
    assert report["blended"] is True, report
    return report


@pytest.fixture(scope="module")
def served(server, context_ids):
    """Full prefill, and reuse at ratio 0 of the chunk computed as a miss (after the context
    and standalone) and by a precompute request."""
    start = len(context_ids)
    prompt = [*context_ids, *CHUNK, *QUESTION]
    spans = [(start, start + len(CHUNK))]
    full = _generate(server, prompt, salt="full")
    miss = _generate(server, prompt, salt="miss", kv_hints=chunk_hints(spans, recompute_ratio=0))
    standalone = _generate(server, prompt, salt="alone", kv_hints=chunk_hints(
        spans, recompute_ratio=0, chunk_context="none"))
    response = requests.post(server.base_url + "/generate", json={
        "input_ids": CHUNK, "cache_salt": "pre", "sampling_params": {"max_new_tokens": 0},
        "kv_hints": precompute_hints()}, timeout=TIMEOUT)
    assert response.status_code == 200, response.text
    pre = _generate(server, prompt, salt="pre", kv_hints=chunk_hints(spans, recompute_ratio=0))
    return full, miss, standalone, pre


def test_chunk_kv_after_the_context_reused_in_place_is_full_prefill(served, context_ids):
    full, miss, standalone, pre = served
    report = _report(miss)
    assert report["chunk_sources"]["computed"] == 1, report
    assert report["chunk_context_tokens"] == len(context_ids) - 1
    assert report["chunk_context_cached"] is False  # the first miss computes the context
    assert miss["output_ids"] == full["output_ids"]
    assert _max_diff(_logprobs(miss), _logprobs(full)) < 2e-3
    # Standalone chunk KV is other KV: the same comparison fails by far.
    assert _report(standalone).get("chunk_context_tokens") is None
    assert _max_diff(_logprobs(standalone), _logprobs(full)) > 20 * 2e-3


def test_a_precomputed_chunk_is_the_same_kv_as_a_miss(served):
    _, miss, _, pre = served
    assert _report(pre)["chunk_sources"]["pool"] == 1
    assert pre["output_ids"] == miss["output_ids"]
    assert _max_diff(_logprobs(pre), _logprobs(miss)) < 2e-3


def test_a_precompute_reuses_the_sink_and_context_kv_of_the_previous_one(served, server,
                                                                         context_ids):
    response = requests.post(server.base_url + "/generate", json={
        "input_ids": OTHER, "cache_salt": "pre", "sampling_params": {"max_new_tokens": 0},
        "kv_hints": precompute_hints()}, timeout=TIMEOUT)
    assert response.status_code == 200, response.text
    assert response.json()["meta_info"]["cached_tokens"] == len(context_ids)
    start = len(context_ids)
    prompt = [*context_ids, *OTHER, *QUESTION]
    full = _generate(server, prompt, salt="full-other")
    reused = _generate(server, prompt, salt="pre", kv_hints=chunk_hints(
        [(start, start + len(OTHER))], recompute_ratio=0))
    assert _report(reused)["chunk_sources"]["pool"] == 1
    assert reused["output_ids"] == full["output_ids"]
    assert _max_diff(_logprobs(reused), _logprobs(full)) < 2e-3


def test_the_context_kv_is_computed_once_and_variants_never_mix(served, server, context_ids):
    start = len(context_ids)
    # A new chunk in the salt whose first miss computed the context: the context is reused.
    prompt = [*context_ids, *OTHER, *QUESTION]
    again = _generate(server, prompt, salt="miss", new_tokens=1, kv_hints=chunk_hints(
        [(start, start + len(OTHER))], recompute_ratio=0.15))
    report = _report(again)
    assert report["chunk_sources"]["computed"] == 1 and report["chunk_context_cached"] is True
    # The chunk precomputed after the context is not standalone KV: asked for that, it misses.
    prompt = [*context_ids, *CHUNK, *QUESTION]
    alone = _generate(server, prompt, salt="pre", new_tokens=1, kv_hints=chunk_hints(
        [(start, start + len(CHUNK))], recompute_ratio=0.15, chunk_context="none"))
    assert _report(alone)["chunk_sources"] == {"pool": 0, "computed": 1,
                                               "recomputed_in_place": 0}


def test_a_bad_chunk_context_is_a_400_and_the_server_keeps_serving(served, server):
    body = {"input_ids": [1, *CHUNK, *QUESTION], "sampling_params": {"max_new_tokens": 1},
            "kv_hints": chunk_hints([(1, 1 + len(CHUNK))])}
    body["kv_hints"]["actions"][0]["payload"]["chunk_context"] = "neighbours"
    response = requests.post(server.base_url + "/generate", json=body, timeout=TIMEOUT)
    assert response.status_code == 400 and "chunk_context" in response.text, response.text
    response = requests.post(server.base_url + "/generate", json={
        "input_ids": CHUNK, "sampling_params": {"max_new_tokens": 0},
        "kv_hints": {**precompute_hints(), "actions": [{
            **precompute_hints()["actions"][0], "payload": {"spans": [[0, 1]]}}]}},
        timeout=TIMEOUT)
    assert response.status_code == 400 and "unknown keys" in response.text, response.text
    _report(_generate(server, [1, *CHUNK, *QUESTION], salt="after", new_tokens=1,
                      kv_hints=chunk_hints([(1, 1 + len(CHUNK))])))


def test_nothing_leaked(served, server):
    assert_nothing_held(server.base_url)


def test_a_recompute_window_keeps_the_budget_and_bad_windows_are_a_400(served, server, context_ids):
    start = len(context_ids)
    prompt = [*context_ids, *CHUNK, *QUESTION]
    reports = {}
    for window in (1, 8):
        out = _generate(server, prompt, salt="miss", new_tokens=1, kv_hints=chunk_hints(
            [(start, start + len(CHUNK))], recompute_ratio=0.15, selector="v_deviation",
            recompute_window=window))
        reports[window] = _report(out)
        assert reports[window]["chunk_sources"]["pool"] == 1
    assert reports[1]["recomputed_rows"] == reports[8]["recomputed_rows"]
    body = {"input_ids": prompt, "sampling_params": {"max_new_tokens": 1},
            "kv_hints": chunk_hints([(start, start + len(CHUNK))])}
    body["kv_hints"]["actions"][0]["payload"]["recompute_window"] = 0
    response = requests.post(server.base_url + "/generate", json=body, timeout=TIMEOUT)
    assert response.status_code == 400 and "recompute_window" in response.text, response.text
