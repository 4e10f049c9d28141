"""Malformed chunk requests on every interface get a 4xx naming the problem, and leave no trace.

Uses the session ``server`` (``--enable-cacheblend``, SmolLM2: 30 layers). After the whole matrix
the server answers a reference request with the same tokens as before it, the pool's free size
is back to its baseline, and the chunk index holds no lock. The matrix itself is
``sglang_cacheblend.eval.bad_inputs.MATRIX`` (its answers: ``docs/results/bad_inputs.md``).
"""

from __future__ import annotations

import requests

import sglang_cacheblend as cb
from sglang_cacheblend.eval.bad_inputs import MATRIX, PASSAGE, post

TIMEOUT = 300


def _state(server) -> dict:
    info = requests.get(server.base_url + "/server_info", timeout=60).json()
    return info["internal_states"][0]["cacheblend"]


def _reference(server) -> list[int]:
    body = {"text": "Passage: " + cb.chunk(PASSAGE * 4) + "\nWhere is the tower?",
            "sampling_params": {"temperature": 0, "max_new_tokens": 12}}
    response = requests.post(server.base_url + "/generate", json=body, timeout=TIMEOUT)
    assert response.status_code == 200, response.text
    return response.json()["output_ids"]


def test_the_matrix_has_at_least_30_distinct_cases():
    assert len({name for name, *_ in MATRIX}) == len(MATRIX) >= 30


def test_frontend_chunk_errors_surface_in_the_program(server):
    import sglang as sgl

    @sgl.function
    def rag(s):
        s += "Q: " + cb.chunk("Paris") + " where?"
        s += sgl.gen("answer", max_tokens=2)

    state = rag.run(backend=sgl.RuntimeEndpoint(server.base_url))
    assert "fewer than this server's minimum of 16" in str(state.error())


def test_every_malformed_request_gets_a_4xx_and_leaves_no_trace(server):
    reference = _reference(server)
    before = _state(server)
    for name, path, body, message in MATRIX:
        response = post(server.base_url, path, body)
        assert 400 <= response.status_code < 500, (name, response.status_code, response.text)
        assert message in response.text, (name, message, response.text)
    after = _state(server)
    assert _reference(server) == reference  # the server still serves, the same tokens
    assert after["token_pool"]["available"] == before["token_pool"]["available"]
    assert after["chunk_index"]["locked_size"] == 0
    assert after["chunk_index"]["num_entries"] == before["chunk_index"]["num_entries"]
