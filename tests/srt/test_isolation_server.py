"""Tenants stay apart: requests with different ``cache_salt`` never share chunk KV or blended
prefixes, on any interface, and no request reaches blended KV without asking for the blend.

Why the salt exists: a shared cache is a timing side channel (a hit answers faster than a miss,
so one tenant could learn which documents another sent); SGLang's ``cache_salt`` partitions the
prefix cache per tenant, and the chunk index honours it the same way. Uses the session server.
"""

from __future__ import annotations

import uuid

import requests

import sglang_cacheblend as cb

TIMEOUT = 300
FACTS = ["The Eiffel Tower is in Paris, the capital of France, and opened in 1889.",
         "Mount Fuji, the highest mountain in Japan, last erupted in 1707.",
         "The Amazon river flows through Peru, Colombia and Brazil to the Atlantic."]


def _passages() -> list[str]:
    tag = uuid.uuid4().hex[:8]
    return [f"[{tag}-{i}] " + " ".join(FACTS[i:] + FACTS[:i]) * 4 for i in range(3)]


def _hits(server) -> int:
    info = requests.get(server.base_url + "/server_info", timeout=60).json()
    return info["internal_states"][0]["cacheblend"]["chunk_index"]["hits"]


def _marked(passages: list[str]) -> str:
    return "Passages:\n" + "\n".join(cb.chunk(p) for p in passages) + "\nWhere is the tower?"


def _send(server, interface: str, passages: list[str], salt: str) -> requests.Response:
    text = _marked(passages)
    if interface == "generate":
        body = {"text": text, "cache_salt": salt,
                "sampling_params": {"temperature": 0, "max_new_tokens": 4}}
        return requests.post(server.base_url + "/generate", json=body, timeout=TIMEOUT)
    if interface == "chat":
        body = {"model": "default", "messages": [{"role": "user", "content": text}],
                "max_tokens": 4, "temperature": 0, "cache_salt": salt}
        return requests.post(server.base_url + "/v1/chat/completions", json=body,
                             timeout=TIMEOUT)
    body = {"model": "default", "prompt": text, "max_tokens": 4, "temperature": 0,
            "cache_salt": salt}
    return requests.post(server.base_url + "/v1/completions", json=body, timeout=TIMEOUT)


def test_chunks_of_one_tenant_are_never_hits_for_another_on_any_interface(server):
    for interface in ("generate", "chat", "completions"):
        passages = _passages()
        owner, other = uuid.uuid4().hex, uuid.uuid4().hex
        cb.precompute_chunks(server.base_url, passages, cache_salt=owner)
        before = _hits(server)
        response = _send(server, interface, passages, other)
        assert response.status_code == 200, (interface, response.text)
        assert _hits(server) == before, f"{interface}: another tenant's chunks were hit"
        again = _send(server, interface, passages, owner)  # the owner does hit them
        assert again.status_code == 200, (interface, again.text)
        assert _hits(server) - before == len(passages), interface


def test_blended_prefixes_serve_neither_plain_requests_nor_other_tenants(server):
    passages, salt = _passages(), uuid.uuid4().hex
    blended = requests.post(server.base_url + "/generate", json={
        "text": _marked(passages), "cache_salt": salt, "return_prompt_token_ids": True,
        "sampling_params": {"temperature": 0, "max_new_tokens": 4}}, timeout=TIMEOUT).json()
    assert blended["meta_info"]["cacheblend"][0]["blended"] is True
    prompt_ids = blended["prompt_token_ids"]

    def cached(body: dict) -> int:
        body = {"sampling_params": {"temperature": 0, "max_new_tokens": 1}, **body}
        reply = requests.post(server.base_url + "/generate", json=body, timeout=TIMEOUT)
        assert reply.status_code == 200, reply.text
        return reply.json()["meta_info"]["cached_tokens"]

    # The same tokens, not asking for the blend: nothing of the blended KV is served.
    assert cached({"input_ids": prompt_ids, "cache_salt": salt}) == 0
    # The same blended request from another tenant: no prefix of the first tenant's.
    assert cached({"text": _marked(passages), "cache_salt": uuid.uuid4().hex}) == 0
    # The same tenant asking again, blended the same way: its own blended prefix is reused.
    assert cached({"text": _marked(passages), "cache_salt": salt}) > 0
