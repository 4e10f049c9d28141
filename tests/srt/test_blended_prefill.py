"""Blended prefill inside the real server: precomputed chunks are reused at new positions.

Each test uses its own ``cache_salt`` so that neither the radix tree nor the chunk index of one
test serves another. Per-request ratios ride in the ``cacheblend.chunks`` action.
"""

from __future__ import annotations

import json
import uuid
from pathlib import Path

import pytest
import requests

import sglang_cacheblend as cb
from sglang_cacheblend.chunks import chunk_hints

SAMPLE = Path(__file__).parent.parent / "data" / "musique_sample.json"
NUM_LAYERS = 30  # SmolLM2-135M
CHECK_LAYER = 1


@pytest.fixture(scope="module")
def tokenizer(model_path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(model_path)


class RagPrompt:
    """Instruction + passages (each tokenized on its own) + question, with chunk spans."""

    def __init__(self, tokenizer, item: dict, order: list[int]) -> None:
        def enc(text: str) -> list[int]:
            return tokenizer(text, add_special_tokens=False).input_ids

        self.passages = [c["text"] + "\n\n" for c in item["ctxs"][:3]]
        self.input_ids = enc("<|im_start|>system\nAnswer the question from the passages."
                             "<|im_end|>\n<|im_start|>user\n")
        self.spans: list[list[int]] = []
        for i in order:
            chunk = enc(self.passages[i])
            self.spans.append([len(self.input_ids), len(self.input_ids) + len(chunk)])
            self.input_ids += chunk
        self.input_ids += enc(f"Question: {item['question']}<|im_end|>\n<|im_start|>assistant\n")

    @property
    def chunk_tokens(self) -> int:
        return sum(end - start for start, end in self.spans)


def _item(index: int) -> dict:
    return json.loads(SAMPLE.read_text())[index]


def _generate(server, prompt: RagPrompt, salt: str, ratio: float | None, blend: bool = True):
    body = {
        "input_ids": prompt.input_ids,
        "sampling_params": {"temperature": 0, "max_new_tokens": 8},
        "return_logprob": True,
        "cache_salt": salt,
    }
    if blend:
        body["kv_hints"] = chunk_hints(prompt.spans, recompute_ratio=ratio)
    response = requests.post(server.base_url + "/generate", json=body, timeout=600)
    response.raise_for_status()
    out = response.json()
    state = requests.get(server.base_url + "/server_info", timeout=60).json()
    report = state["internal_states"][0]["cacheblend"]
    (blend,) = out["meta_info"].get("cacheblend") or [None]
    return out, blend, report["token_pool"]


def _setup(server, tokenizer, item: int, order: list[int]) -> tuple[RagPrompt, str]:
    salt = uuid.uuid4().hex
    prompt = RagPrompt(tokenizer, _item(item), order)
    cb.precompute_chunks(server.base_url, prompt.passages, cache_salt=salt)
    return prompt, salt


def test_ratio_one_gives_the_same_greedy_tokens_as_blending_off(server, tokenizer):
    prompt, salt = _setup(server, tokenizer, 0, [0, 1, 2])
    blended, stats, _ = _generate(server, prompt, salt, ratio=1.0)
    assert stats is not None and stats["reused_tokens"] == prompt.chunk_tokens
    assert stats["recomputed_rows"] == stats["full_rows"] == len(prompt.input_ids) * NUM_LAYERS
    plain, plain_stats, _ = _generate(server, prompt, salt, ratio=None, blend=False)
    assert plain_stats is None  # a normal request takes SGLang's stock forward
    assert blended["output_ids"] == plain["output_ids"]
    first = [r["meta_info"]["output_token_logprobs"][0][0] for r in (blended, plain)]
    assert abs(first[0] - first[1]) < 0.1, first


def test_ratio_zero_recomputes_only_the_uncached_rows_after_the_check_layer(server, tokenizer):
    prompt, salt = _setup(server, tokenizer, 1, [2, 0, 1])
    _, stats, _ = _generate(server, prompt, salt, ratio=0.0)
    n = len(prompt.input_ids)
    uncached = n - prompt.chunk_tokens
    assert stats["reused_tokens"] == prompt.chunk_tokens
    assert stats["recomputed_rows"] == (CHECK_LAYER + 1) * n + (
        NUM_LAYERS - CHECK_LAYER - 1) * uncached


def test_reordered_chunks_hit_and_blend_at_the_server_ratio(server, tokenizer):
    prompt, salt = _setup(server, tokenizer, 2, [0, 1, 2])
    reordered = RagPrompt(tokenizer, _item(2), [2, 1, 0])
    out, stats, pool = _generate(server, reordered, salt, ratio=None)
    assert stats["reused_tokens"] == reordered.chunk_tokens
    # The server runs with the default ratio (0.15): far fewer rows than a full prefill.
    assert stats["recomputed_rows"] < 0.5 * stats["full_rows"]
    assert len(out["output_ids"]) == 8
    assert pool["protected"] == 0 and pool["available"] + pool["evictable"] == pool["total"]
