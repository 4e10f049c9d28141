"""Context families through a real server: each chunk precomputed after a context of its own.

The exactness check is the chunk context's: a chunk placed in a prompt right after
``BOS + its context`` sits exactly where its KV was computed, so reusing it at ratio 0 through
its family must give full prefill's own logprobs. Standalone chunk KV of the same chunk does
not (the check can fail). The family name is the key, not each chunk's context: a request names
the family only, a chunk the family lacks is prefilled in place (never computed standalone and
filed under the family), and families never mix with each other or with standalone chunks.
"""

from __future__ import annotations

import random

import pytest
import requests

from sglang_cacheblend.chunks import chunk_hints, precompute_hints
from tests.conftest import FLOAT32, STANDALONE_CHUNKS, running_server
from tests.srt.exactness import assert_nothing_held
from tests.srt.exactness import cacheblend_report as _report
from tests.srt.exactness import max_abs_diff as _max_diff
from tests.srt.exactness import output_logprobs as _logprobs

TIMEOUT = 600
rng = random.Random(23)
CONTEXT = [rng.randrange(1000, 40000) for _ in range(150)]
CHUNK = [rng.randrange(1000, 40000) for _ in range(200)]
OTHER = [rng.randrange(1000, 40000) for _ in range(120)]
QUESTION = list(range(2000, 2016))
NEW_TOKENS = 6
FAMILY = "random-3"


@pytest.fixture(scope="module")
def bos(model_path) -> int:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(model_path).bos_token_id


@pytest.fixture(scope="module")
def server(model_path, tmp_path_factory):
    # fp32: the exactness check compares logprobs to 2e-3, which bf16 rounding alone exceeds
    # (test_served_dtype_server.py holds what bf16 promises). Standalone chunk KV is what the
    # family's KV is compared against, and what requests that name no family get.
    args = ["--enable-cacheblend", *FLOAT32, *STANDALONE_CHUNKS,
            "--cacheblend-min-reused-tokens", "16"]
    with running_server(model_path, tmp_path_factory.mktemp("family"), args) as proc:
        yield proc


def _post(server, body):
    return requests.post(server.base_url + "/generate", json=body, timeout=TIMEOUT)


def _generate(server, input_ids, *, salt, kv_hints=None, new_tokens=NEW_TOKENS):
    body = {"input_ids": input_ids, "cache_salt": salt, "return_logprob": True,
            "sampling_params": {"max_new_tokens": new_tokens, "temperature": 0}}
    if kv_hints is not None:
        body["kv_hints"] = kv_hints
    response = _post(server, body)
    assert response.status_code == 200, response.text
    return response.json()


def _precompute(server, chunk_ids, *, salt, family=FAMILY, context=CONTEXT):
    response = _post(server, {
        "input_ids": chunk_ids, "cache_salt": salt, "sampling_params": {"max_new_tokens": 0},
        "kv_hints": precompute_hints(context_family=family, context_ids=context)})
    assert response.status_code == 200, response.text
    return response.json()


@pytest.fixture(scope="module")
def served(server, bos):
    """Full prefill; reuse at ratio 0 of the chunk precomputed in the family, and of the same
    chunk's standalone KV."""
    start = 1 + len(CONTEXT)
    prompt = [bos, *CONTEXT, *CHUNK, *QUESTION]
    spans = [(start, start + len(CHUNK))]
    full = _generate(server, prompt, salt="full")
    _precompute(server, CHUNK, salt="fam")
    family = _generate(server, prompt, salt="fam", kv_hints=chunk_hints(
        spans, recompute_ratio=0, context_family=FAMILY))
    standalone = _generate(server, prompt, salt="alone", kv_hints=chunk_hints(
        spans, recompute_ratio=0))
    return full, family, standalone


def test_a_family_chunk_reused_after_its_own_context_is_full_prefill(served):
    full, family, standalone = served
    report = _report(family)
    assert report["blended"] is True and report["chunk_context_family"] == FAMILY, report
    assert report["chunk_sources"]["pool"] == 1, report
    assert family["output_ids"] == full["output_ids"]
    assert _max_diff(_logprobs(family), _logprobs(full)) < 2e-3
    # The same chunk's standalone KV is other KV: the same comparison fails by far.
    assert _report(standalone)["chunk_sources"]["computed"] == 1
    assert _max_diff(_logprobs(standalone), _logprobs(full)) > 20 * 2e-3


def test_a_chunk_the_family_lacks_is_prefilled_in_place_and_not_filed_under_it(served, server,
                                                                                  bos):
    del served  # the family holds CHUNK
    start = 1 + len(CONTEXT)
    # CHUNK is in the family, OTHER is not: OTHER is prefilled in place, never computed
    # standalone (its context is unknown to the server), and not cached: in the other order
    # (so the first prompt is not a prefix hit) it is prefilled in place again.
    for first, second in ((CHUNK, OTHER), (OTHER, CHUNK)):
        prompt = [bos, *CONTEXT, *first, *second, *QUESTION]
        middle = start + len(first)
        spans = [(start, middle), (middle, middle + len(second))]
        report = _report(_generate(server, prompt, salt="fam", new_tokens=1, kv_hints=chunk_hints(
            spans, recompute_ratio=0.15, context_family=FAMILY)))
        assert report["blended"] is True, report
        assert report["chunk_sources"] == {"pool": 1, "computed": 0, "recomputed_in_place": 1}
    # Only chunks the family lacks: a normal prefill that says why, with full prefill's answer.
    prompt = [bos, *CONTEXT, *OTHER, *QUESTION]
    out = _generate(server, prompt, salt="fam", kv_hints=chunk_hints(
        [(start, start + len(OTHER))], recompute_ratio=0, context_family=FAMILY))
    report = _report(out)
    assert report["blended"] is False and FAMILY in report["reason"], report
    reference = _generate(server, prompt, salt="full-other")
    assert out["output_ids"] == reference["output_ids"]


def test_families_never_mix_with_each_other_or_with_standalone_chunks(served, server, bos):
    start = 1 + len(CONTEXT)
    prompt = [bos, *CONTEXT, *CHUNK, *QUESTION]
    spans = [(start, start + len(CHUNK))]
    other_family = _report(_generate(server, prompt, salt="fam", new_tokens=1, kv_hints=chunk_hints(
        spans, recompute_ratio=0, context_family="bm25-3")))
    assert other_family["blended"] is False, other_family
    standalone = _report(_generate(server, prompt, salt="fam", new_tokens=1, kv_hints=chunk_hints(
        spans, recompute_ratio=0)))
    assert standalone["chunk_sources"]["computed"] == 1, standalone


def test_a_family_precompute_does_not_file_its_context_in_the_prefix_tree(served, server):
    context = [rng.randrange(1000, 40000) for _ in range(64)]
    first = _precompute(server, OTHER, salt="tree", context=context, family="tree")
    again = _precompute(server, CHUNK, salt="tree", context=context, family="tree")
    # The context's KV was not kept: at most a BOS that other prompts start with is shared.
    assert again["meta_info"]["cached_tokens"] == first["meta_info"]["cached_tokens"] <= 1


def test_precompute_chunks_files_texts_in_a_family_after_their_own_contexts(served, server, bos,
                                                                           model_path):
    from transformers import AutoTokenizer

    from sglang_cacheblend.chunks import precompute_chunks

    tokenizer = AutoTokenizer.from_pretrained(model_path)
    texts = ["The lighthouse keeper rowed out to the reef every morning before the tide. " * 3,
             "Copper wire carries the current from the dynamo to the village square. " * 3]
    contexts = [CONTEXT[:40], CONTEXT[40:100]]
    precompute_chunks(server.base_url, texts, cache_salt="texts", context_family="texts",
                      contexts=contexts)
    ids = [tokenizer.encode(t, add_special_tokens=False) for t in texts]
    prompt = [bos, *ids[1], *ids[0], *QUESTION]
    spans = [(1, 1 + len(ids[1])), (1 + len(ids[1]), 1 + len(ids[1]) + len(ids[0]))]
    report = _report(_generate(server, prompt, salt="texts", new_tokens=1, kv_hints=chunk_hints(
        spans, recompute_ratio=0.15, context_family="texts")))
    assert report["chunk_sources"] == {"pool": 2, "computed": 0, "recomputed_in_place": 0}
    with pytest.raises(ValueError, match="together"):
        precompute_chunks(server.base_url, texts, context_family="texts")


@pytest.mark.parametrize("payload, precompute, needle", [
    ({"context_family": "no spaces"}, False, "context_family"),
    ({"context_family": FAMILY, "context_ids": [5, 6]}, False, "context_ids"),
    ({"context_family": FAMILY, "chunk_context": "none"}, False, "not both"),
    ({"context_family": FAMILY}, True, "context_ids"),
    ({"context_family": FAMILY, "context_ids": [10**8]}, True, "vocabulary"),
    ({"context_family": FAMILY, "context_ids": [-1]}, True, "non-negative"),
    ({"context_family": FAMILY, "context_ids": [5] * 9000}, True, "context_len"),
    ({"context_ids": [5]}, True, "context_family"),
])
def test_bad_family_fields_are_a_400_and_the_server_keeps_serving(served, server, bos, payload,
                                                                   precompute, needle):
    if precompute:
        hints = precompute_hints()
        body = {"input_ids": CHUNK, "sampling_params": {"max_new_tokens": 0}}
    else:
        hints = chunk_hints([(1, 1 + len(CHUNK))])
        body = {"input_ids": [bos, *CHUNK, *QUESTION], "sampling_params": {"max_new_tokens": 1}}
    hints["actions"][0]["payload"].update(payload)
    response = _post(server, {**body, "kv_hints": hints})
    assert response.status_code == 400 and needle in response.text, response.text
    assert _generate(server, [bos, *QUESTION], salt="after", new_tokens=1)["output_ids"]


def test_nothing_leaked(served, server):
    assert_nothing_held(server.base_url)
