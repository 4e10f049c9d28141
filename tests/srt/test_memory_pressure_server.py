"""A small pool full of chunks: a request that hits all of them must not kill the server.

Review F1, reproduced as it was found: with ``--max-total-tokens 6000``, 8 precomputed chunks of
475 tokens (3,800 evictable tokens) and one request that hits all 8, SGLang's admission check
passes (it counts the hits as evictable), the hits were then locked and the request's own prefill
allocation ran out of memory, which stops SGLang's scheduler. Now admission falls back to a
normal prefill (reported) and the server keeps serving; the request is answered as full prefill
would answer it, and nothing stays locked or allocated.
"""

from __future__ import annotations

import random

import pytest
import requests

from sglang_cacheblend.chunks import chunk_hints, precompute_hints
from tests.conftest import FLOAT32, STANDALONE_CHUNKS, running_server

TIMEOUT = 600
POOL = 6000


@pytest.fixture(scope="module")
def small_server(model_path, tmp_path_factory):
    # The finding's own setup (standalone chunk KV: 8 x 475 chunk tokens are all the pool
    # holds besides the sink); fp32, as the fallback's answer is compared with full prefill's.
    args = ["--enable-cacheblend", *FLOAT32, *STANDALONE_CHUNKS, "--max-total-tokens", str(POOL)]
    with running_server(model_path, tmp_path_factory.mktemp("small_server"), args) as proc:
        yield proc


def _state(server) -> dict:
    info = requests.get(server.base_url + "/server_info", timeout=60).json()
    return info["internal_states"][0]["cacheblend"]


def test_a_request_hitting_every_chunk_of_a_full_pool_is_served(small_server):
    rng = random.Random(0)
    chunks = [[rng.randrange(1000, 40000) for _ in range(475)] for _ in range(8)]
    pre = requests.post(small_server.base_url + "/generate", json={
        "input_ids": chunks, "sampling_params": {"max_new_tokens": 0},
        "kv_hints": precompute_hints()}, timeout=TIMEOUT)
    assert pre.status_code == 200, pre.text
    assert _state(small_server)["chunk_index"]["evictable_size"] == 8 * 475

    ids, spans = [1], []
    for chunk in chunks:
        spans.append((len(ids), len(ids) + len(chunk)))
        ids += chunk
    ids += list(range(2000, 2020))
    body = {"input_ids": ids, "sampling_params": {"max_new_tokens": 8, "temperature": 0}}
    blended = requests.post(small_server.base_url + "/generate",
                            json={**body, "kv_hints": chunk_hints(spans)}, timeout=TIMEOUT)
    assert blended.status_code == 200, blended.text
    assert requests.get(small_server.base_url + "/health", timeout=30).status_code == 200
    (report,) = blended.json()["meta_info"]["cacheblend"]  # one report per prompt
    assert report["chunk_hits"] == 8 and report["blended"] is False
    assert "not enough KV memory" in report["reason"]

    # Answered as a full prefill: the same tokens as the same prompt without chunks.
    plain = requests.post(small_server.base_url + "/generate", json=body, timeout=TIMEOUT)
    assert plain.json()["output_ids"] == blended.json()["output_ids"]
    state = _state(small_server)
    pool = state["token_pool"]
    assert pool["available"] + pool["evictable"] + pool["protected"] == pool["total"]
    assert state["chunk_index"]["locked_size"] == 0
