"""Issue 25 G1 and G3 on a real server with the shipped defaults: requests that SGLang's scheduler
aborts into a one-token stub or truncates after tokenization, with chunks marked, used to stop
the whole server (the stub's spans lay past its prompt, and the chunk lookup raised out of the
scheduler loop). Each must now get its own answer (an error for the request, or a served,
unblended prompt that says why), and the server must keep serving the same tokens with the pool
and the chunk locks back to their baseline.

G3: after ``/update_weights_from_disk``, no chunk KV computed with the old weights is served,
from the pool or from the disk tier.

One server: ``--max-total-tokens 6000`` (so a 7,000-token prompt fits the model's context but
not the pool), ``--allow-auto-truncate`` (so such a prompt is cut, not refused), a disk tier.
"""

from __future__ import annotations

import random

import pytest
import requests

import sglang_cacheblend as cb
from sglang_cacheblend.serving.admission import PROMPT_CHANGED
from tests.conftest import running_server

TIMEOUT = 300
CHUNK_TOKENS = 200


@pytest.fixture(scope="module")
def server(model_path, tmp_path_factory):
    log_dir = tmp_path_factory.mktemp("rewrites")
    args = ["--enable-cacheblend", "--max-total-tokens", "6000", "--allow-auto-truncate",
            "--cacheblend-disk-tier-dir", str(log_dir / "disk")]
    with running_server(model_path, log_dir, args) as proc:
        yield proc


def _chunks(num_chunks: int, seed: int) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(1000, 20000) for _ in range(CHUNK_TOKENS)] for _ in range(num_chunks)]


def _prompt(num_chunks: int, seed: int, *, chunks: list[list[int]] | None = None,
            ) -> tuple[list[int], list[tuple[int, int]]]:
    """Token ids (ordinary vocabulary ids) with marked chunks and a question around them."""
    rng = random.Random(seed)
    ids, spans = [rng.randrange(1000, 20000) for _ in range(8)], []
    for chunk in chunks if chunks is not None else _chunks(num_chunks, seed):
        spans.append((len(ids), len(ids) + len(chunk)))
        ids += chunk
    ids += [rng.randrange(1000, 20000) for _ in range(8)]
    return ids, spans


def _generate(server, ids, spans, **extra) -> requests.Response:
    body = {"input_ids": ids, "kv_hints": cb.chunk_hints(spans),
            "sampling_params": {"temperature": 0, "max_new_tokens": 4,
                                **extra.pop("sampling_params", {})}, **extra}
    return requests.post(server.base_url + "/generate", json=body, timeout=TIMEOUT)


def _state(server) -> dict:
    info = requests.get(server.base_url + "/server_info", timeout=60).json()
    return info["internal_states"][0]["cacheblend"]


CASES = {
    "logprob_start_len past the prompt": dict(return_logprob=True, logprob_start_len=100_000),
    "an invalid regex": dict(sampling_params={"regex": "("}),
    "an invalid json_schema": dict(sampling_params={"json_schema": "{not json"}),
}


def test_requests_sglang_aborts_after_tokenization_leave_the_server_serving(server):
    ids, spans = _prompt(3, seed=1)
    reference = _generate(server, ids, spans)
    assert reference.status_code == 200, reference.text
    before = _state(server)
    for name, extra in CASES.items():
        response = _generate(server, ids, spans, **extra)
        # SGLang answers these itself (an abort: a 4xx, or 200 with an abort finish reason).
        assert response.status_code != 500 or "abort" in response.text.lower(), (name,
                                                                                  response.text)
        again = _generate(server, ids, spans)  # the server is alive and serves the same tokens
        assert again.status_code == 200, (name, again.text)
        assert again.json()["output_ids"] == reference.json()["output_ids"], name
    after = _state(server)
    assert after["chunk_index"]["locked_size"] == 0
    assert after["token_pool"]["protected"] == 0  # nothing leaked: all free or evictable

    def held(state):
        return state["token_pool"]["available"] + state["token_pool"]["evictable"]

    assert held(after) == held(before)


PASSAGE = ("The Eiffel Tower is in Paris, the capital of France, and was built in 1889 for the "
           "World's Fair; it is made of wrought iron and was the tallest structure until 1930. ")


def _chat(server, **extra) -> requests.Response:
    body = {"model": "default", "max_tokens": 4, "temperature": 0, "messages": [
        {"role": "user", "content": "Passage: " + cb.chunk(PASSAGE * 3) + "\nWhere is it?"}],
        **extra}
    return requests.post(server.base_url + "/v1/chat/completions", json=body, timeout=TIMEOUT)


CHAT_CASES = {
    "chat: an invalid json_schema": dict(response_format={
        "type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "no-such-type"}}}),
    "chat: an invalid regex": dict(regex="("),
    "chat: logprobs with a bad top_logprobs": dict(logprobs=True, top_logprobs=10_000),
}


def test_the_same_aborts_through_the_openai_api(server):
    reference = _chat(server)
    assert reference.status_code == 200, reference.text
    for name, extra in CHAT_CASES.items():
        _chat(server, **extra)  # SGLang answers it (an error or an abort): it must not kill
        again = _chat(server)
        assert again.status_code == 200, (name, again.text)
        assert again.json()["choices"][0]["message"] == reference.json()["choices"][0][
            "message"], name
    assert _state(server)["chunk_index"]["locked_size"] == 0


def test_a_prompt_the_scheduler_truncates_is_served_unblended_and_says_why(server):
    ids, spans = _prompt(34, seed=2)  # ~6.8k tokens: inside context_len, past the pool
    assert 6000 < len(ids) < 8192
    response = _generate(server, ids, spans)
    assert response.status_code == 200, response.text
    for report in response.json()["meta_info"].get("cacheblend") or []:
        assert report["blended"] is False and report["reason"] == PROMPT_CHANGED
    small, small_spans = _prompt(3, seed=3)
    assert _generate(server, small, small_spans).status_code == 200
    assert _state(server)["chunk_index"]["locked_size"] == 0


def _sources(response: requests.Response) -> dict:
    assert response.status_code == 200, response.text
    report = response.json()["meta_info"]["cacheblend"]
    report = report[0] if isinstance(report, list) else report
    assert report["blended"] is True, report
    return report["chunk_sources"]


def test_no_chunk_kv_of_the_old_weights_is_served_after_a_weights_update(server, model_path):
    chunks = _chunks(3, seed=4)
    ids, spans = _prompt(3, seed=4, chunks=chunks)
    assert _sources(_generate(server, ids, spans))["computed"] == 3
    reordered, reordered_spans = _prompt(3, seed=5, chunks=chunks[::-1])
    assert _sources(_generate(server, reordered, reordered_spans))["pool"] == 3
    update = requests.post(server.base_url + "/update_weights_from_disk",
                           json={"model_path": str(model_path)}, timeout=TIMEOUT)
    assert update.status_code == 200 and update.json()["success"], update.text
    # The pool was flushed and the disk tier still holds the three chunks: neither may serve.
    third, third_spans = _prompt(3, seed=6, chunks=chunks[1:] + chunks[:1])
    sources = _sources(_generate(server, third, third_spans))
    assert sources["computed"] == 3 and not sources.get("disk"), sources
