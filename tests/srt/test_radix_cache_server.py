"""The ``cacheblend`` radix-cache backend inside a real server must not change normal SGLang."""

from __future__ import annotations

import concurrent.futures

import pytest
import requests

from sglang_cacheblend.launch import ServerProcess
from tests.conftest import free_port

PROMPTS = [
    "The three primary colours are",
    "Question: What is 2 + 3?\nAnswer:",
    "Once upon a time, in a small village by the sea,",
    "def fibonacci(n):\n    ",
]
SHARED_PREFIX = "You are a concise assistant. Answer in one sentence.\n\n"


@pytest.fixture(scope="module")
def plain_server(model_path, tmp_path_factory):
    """Stock SGLang (default UnifiedRadixCache), same model and flags, plugin loaded but off."""
    log_path = tmp_path_factory.mktemp("plain") / "sglang.log"
    with ServerProcess(port=free_port(), model_path=model_path, log_path=log_path) as proc:
        yield proc


def _generate(server: ServerProcess, text: str) -> dict:
    response = requests.post(
        server.base_url + "/generate",
        json={"text": text, "sampling_params": {"temperature": 0, "max_new_tokens": 12}},
        timeout=300,
    )
    response.raise_for_status()
    return response.json()


def _cacheblend_state(server: ServerProcess) -> dict:
    info = requests.get(server.base_url + "/server_info", timeout=60).json()
    return info["internal_states"][0]["cacheblend"]


def test_backend_is_selected_by_the_launch_flag(server, plain_server):
    assert _cacheblend_state(server)["tree_cache"] == "CacheBlendRadixCache"
    # The launch flag also loads our model classes through SGLANG_EXTERNAL_MODEL_PACKAGE.
    assert _cacheblend_state(server)["model_class"] == (
        "sglang_cacheblend.srt.models.llama.LlamaForCausalLM")
    # Without the flag the plugin is loaded but every hook is inert: not even the report.
    info = requests.get(plain_server.base_url + "/server_info", timeout=60).json()
    assert "cacheblend" not in info["internal_states"][0]
    assert "--enable-cacheblend" not in info.get("launch_command", "")


def test_same_greedy_outputs_as_default_backend_including_prefix_hits(server, plain_server):
    for prompt in PROMPTS:
        text = SHARED_PREFIX + prompt
        first = [_generate(s, text) for s in (server, plain_server)]
        again = [_generate(s, text) for s in (server, plain_server)]  # exact prefix hit
        assert first[0]["output_ids"] == first[1]["output_ids"], prompt
        assert again[0]["output_ids"] == again[1]["output_ids"] == first[0]["output_ids"]
        cached = [r["meta_info"]["cached_tokens"] for r in again]
        assert cached[0] == cached[1] > 0, cached


def test_pool_returns_to_its_start_after_a_batch(server):
    before = _cacheblend_state(server)["token_pool"]
    texts = [f"{SHARED_PREFIX}Item {i}: {p}" for i, p in enumerate(PROMPTS * 3)]
    with concurrent.futures.ThreadPoolExecutor(max_workers=6) as pool:
        list(pool.map(lambda t: _generate(server, t), texts))
    after = _cacheblend_state(server)["token_pool"]
    assert after["protected"] == 0  # no request still holds a lock
    assert after["available"] + after["evictable"] == after["total"]  # nothing leaked
    assert after["evictable"] > before["evictable"]  # the batch was cached
    requests.post(server.base_url + "/flush_cache", timeout=60).raise_for_status()
    flushed = _cacheblend_state(server)["token_pool"]
    assert flushed["available"] == flushed["total"] and flushed["evictable"] == 0
