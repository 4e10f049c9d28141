"""Misses, multi-turn and per-response accounting of blended requests, on the real server.

Each test uses its own ``cache_salt``, so neither the prefix tree nor the chunk index of one test
serves another.
"""

from __future__ import annotations

import uuid
from pathlib import Path

import pytest
import requests

from sglang_cacheblend.chunks import ChunkedPrompt, chunk_hints, precompute_hints
from sglang_cacheblend.dataset import build_prompt, load_items, tokenize_prompt

SAMPLE = Path(__file__).parent.parent / "data" / "musique_sample.json"


@pytest.fixture(scope="module")
def encode(model_path):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_path)
    return lambda text: tokenizer(text, add_special_tokens=False).input_ids


def _prompt(encode, item: int, order: list[int] | None = None, passages: int = 3) -> ChunkedPrompt:
    rag = build_prompt(load_items(SAMPLE)[item], num_passages=passages)
    return tokenize_prompt(rag if order is None else rag.reordered(order), encode)


def _generate(server, input_ids, spans, salt: str, *, ratio: float | None = None,
              max_new_tokens: int = 6, **extra) -> dict:
    body = {
        "input_ids": list(input_ids),
        "sampling_params": {"temperature": 0, "max_new_tokens": max_new_tokens},
        "cache_salt": salt,
        "return_logprob": True,
        **extra,
    }
    if spans is not None:
        body["kv_hints"] = chunk_hints(spans, recompute_ratio=ratio)
    response = requests.post(server.base_url + "/generate", json=body, timeout=900)
    assert response.status_code == 200, response.text
    return response.json()


def _report(out: dict) -> dict | None:
    reports = out["meta_info"].get("cacheblend")
    return None if reports is None else reports[0]


def _state(server) -> dict:
    info = requests.get(server.base_url + "/server_info", timeout=60).json()
    return info["internal_states"][0]["cacheblend"]


def _chunk_tokens(prompt: ChunkedPrompt) -> int:
    return sum(end - start for start, end in prompt.spans)


def test_missed_chunks_are_computed_standalone_and_hit_by_the_next_request(standalone_server,
                                                                            encode):
    """On ``standalone_server``: the token accounting is of chunks computed after the sink only,
    and the two ways of computing them are compared in fp32."""
    server = standalone_server
    salt = uuid.uuid4().hex
    index_before = _state(server)["chunk_index"]
    first = _prompt(encode, 0)
    out = _generate(server, first.input_ids, first.spans, salt, ratio=0.0)
    report = _report(out)
    assert report["blended"] and (report["chunk_hits"], report["chunk_misses"]) == (0, 3)
    assert report["computed_standalone_tokens"] == _chunk_tokens(first)
    assert report["reused_tokens"] == _chunk_tokens(first)

    reordered = _prompt(encode, 0, order=[2, 0, 1])
    auto = _generate(server, reordered.input_ids, reordered.spans, salt, ratio=0.0)
    report = _report(auto)
    assert (report["chunk_hits"], report["chunk_misses"]) == (3, 0)
    assert report["computed_standalone_tokens"] == 0
    state = _state(server)
    index = state["chunk_index"]
    # The server is shared with earlier tests, so older entries may be evicted meanwhile: the
    # index gained exactly our three chunks, net of whatever it evicted.
    assert index["inserts"] == index_before["inserts"] + 3
    evicted = index["evictions"] - index_before["evictions"]
    assert index["num_entries"] == index_before["num_entries"] + 3 - evicted
    pool = state["token_pool"]  # sink slots freed, chunk slots owned by the index: no leak
    assert pool["protected"] == 0 and pool["available"] + pool["evictable"] == pool["total"]

    # The same chunks precomputed by explicit requests (SGLang's own prefill of sink + chunk)
    # give the same answer at ratio 0, where the answer depends on nothing but chunk KV.
    other_salt = uuid.uuid4().hex
    for start, end in reordered.spans:
        body = {"input_ids": reordered.input_ids[start:end], "cache_salt": other_salt,
                "sampling_params": {"max_new_tokens": 0}, "kv_hints": precompute_hints()}
        assert requests.post(server.base_url + "/generate", json=body, timeout=600).ok
    explicit = _generate(server, reordered.input_ids, reordered.spans, other_salt, ratio=0.0)
    assert _report(explicit)["chunk_hits"] == 3
    assert auto["output_ids"] == explicit["output_ids"]
    logprobs = [o["meta_info"]["output_token_logprobs"][0][0] for o in (auto, explicit)]
    assert abs(logprobs[0] - logprobs[1]) < 0.05, logprobs


def test_follow_up_turn_reuses_the_blended_turn_as_its_prefix(server, encode):
    salt = uuid.uuid4().hex
    turn1 = _prompt(encode, 1)
    out1 = _generate(server, turn1.input_ids, turn1.spans, salt)
    assert _report(out1)["blended"]
    follow_up = encode("<|im_end|>\n<|im_start|>user\nSay it in one word.<|im_end|>\n"
                       "<|im_start|>assistant\n")
    turn2_ids = [*turn1.input_ids, *out1["output_ids"], *follow_up]
    out2 = _generate(server, turn2_ids, turn1.spans, salt)
    assert out2["meta_info"]["cached_tokens"] >= len(turn1.input_ids)
    report = _report(out2)
    assert report["prefix_cached_tokens"] == out2["meta_info"]["cached_tokens"]
    assert not report["blended"] and report["reason"] == "no chunk outside the cached prefix"
    # The blended KV is approximate: a request that did not ask for blending never matches it.
    plain = _generate(server, turn2_ids, None, salt)
    assert plain["meta_info"]["cached_tokens"] == 0 and _report(plain) is None


def test_blended_prefixes_are_not_shared_across_ratios(server, encode):
    salt = uuid.uuid4().hex
    prompt = _prompt(encode, 2)
    _generate(server, prompt.input_ids, prompt.spans, salt, ratio=0.15)
    again = _generate(server, prompt.input_ids, prompt.spans, salt, ratio=0.15)
    assert again["meta_info"]["cached_tokens"] == len(prompt.input_ids) - 1
    other = _generate(server, prompt.input_ids, prompt.spans, salt, ratio=0.0)
    assert other["meta_info"]["cached_tokens"] == 0
    report = _report(other)
    assert report["blended"] and report["chunk_hits"] == 3


def test_meta_info_reports_the_blend_and_why_a_request_was_not_blended(server, encode):
    salt = uuid.uuid4().hex
    prompt = _prompt(encode, 0, passages=2)
    out = _generate(server, prompt.input_ids, prompt.spans, salt)
    report = _report(out)
    layers = 30  # SmolLM2-135M
    assert report["prefix_cached_tokens"] == out["meta_info"]["cached_tokens"] == 0
    assert report["chunk_reused_tokens"] == _chunk_tokens(prompt)
    assert report["full_rows"] == len(prompt.input_ids) * layers
    assert 0 < report["recomputed_rows"] < report["full_rows"]
    assert report["blend_time_s"] > 0 and report["standalone_time_s"] > 0

    short = tokenize_prompt(build_prompt(load_items(SAMPLE)[0], num_passages=1), encode)
    start, _ = short.spans[0]
    tiny = ChunkedPrompt(short.input_ids[: start + 20] + short.input_ids[-12:],
                         ((start, start + 20),))
    # A fresh salt: the first request's blended prefix would cover the tiny chunk.
    report = _report(_generate(server, tiny.input_ids, tiny.spans, uuid.uuid4().hex))
    assert not report["blended"] and "min_reused_tokens=256" in report["reason"]
