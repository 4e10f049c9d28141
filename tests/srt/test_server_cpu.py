"""SGLang serves the embedded model on CPU through our plugin, and matches transformers."""

from __future__ import annotations

import subprocess
import sys

import requests
import torch

from sglang_cacheblend.launch import cpu_dtype
from tests.conftest import NON_DEFAULT_RATIO

# The dtype the server runs in on this CPU (``serve`` picks it); transformers runs the same.
DTYPE = getattr(torch, cpu_dtype())
# Max gap between the two engines' log-probs: kernel rounding only.
LOGPROB_TOL = 0.3 if DTYPE == torch.bfloat16 else 0.02

# A prompt whose greedy path has a clear winner at each of the 16 steps (top-2 log-prob gap
# >= 1.75 in transformers bf16), so kernel-level bf16 noise cannot flip a token.
CHAT = [{"role": "user", "content": "What is the capital of France? Answer with one word."}]
NEW_TOKENS = 16


def _transformers_greedy(model_path, input_ids: list[int]) -> tuple[list[int], list[float]]:
    """Greedy tokens and their log-probs from transformers, same weights, same dtype."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=DTYPE).eval()
    with torch.no_grad():
        out = model.generate(
            torch.tensor([input_ids]), max_new_tokens=NEW_TOKENS, do_sample=False,
            eos_token_id=None, pad_token_id=model.config.eos_token_id,
        )
        logprobs = model(out).logits[0, len(input_ids) - 1 : -1].float().log_softmax(-1)
    tokens = out[0, len(input_ids):]
    return tokens.tolist(), logprobs.gather(-1, tokens[:, None])[:, 0].tolist()


def test_served_greedy_matches_transformers(server, model_path):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_path)
    text = tokenizer.apply_chat_template(CHAT, add_generation_prompt=True, tokenize=False)
    input_ids = tokenizer(text, add_special_tokens=False).input_ids
    response = requests.post(
        server.base_url + "/generate",
        json={
            "input_ids": input_ids,
            "sampling_params": {"temperature": 0, "max_new_tokens": NEW_TOKENS,
                                "ignore_eos": True},
            "return_logprob": True,
        },
        timeout=300,
    )
    response.raise_for_status()
    body = response.json()
    served = body["output_ids"]
    expected, expected_logprobs = _transformers_greedy(model_path, input_ids)
    assert len(served) == NEW_TOKENS
    assert served == expected, (tokenizer.decode(served), tokenizer.decode(expected))
    served_logprobs = [entry[0] for entry in body["meta_info"]["output_token_logprobs"]]
    gaps = [abs(a - b) for a, b in zip(served_logprobs, expected_logprobs)]
    assert max(gaps) < LOGPROB_TOL, gaps


def test_chat_completion_answers(server):
    response = requests.post(
        server.base_url + "/v1/chat/completions",
        json={"model": "default", "temperature": 0, "max_tokens": 16,
              "messages": [{"role": "user", "content": "What is the capital of France?"}]},
        timeout=300,
    )
    response.raise_for_status()
    assert "Paris" in response.json()["choices"][0]["message"]["content"]


def test_plugin_is_active_in_scheduler_process(standalone_server):
    """On the server launched with a non-default ratio, so the flag's value is what is seen."""
    server = standalone_server
    info = requests.get(server.base_url + "/server_info", timeout=60).json()
    report = info["internal_states"][0]["cacheblend"]
    assert report["plugin_loaded"] is True
    # The scheduler runs in its own process, and sees the flags given at launch.
    assert report["pid"] != server.pid
    assert report["enabled"] is True
    assert report["blend"]["recompute_ratio"] == NON_DEFAULT_RATIO
    assert "--enable-cacheblend" in info["launch_command"]


def test_invalid_cacheblend_flag_is_rejected_with_a_message(model_path):
    result = subprocess.run(
        [sys.executable, "-m", "sglang.launch_server", "--model-path", str(model_path),
         "--host", "127.0.0.1", "--enable-cacheblend", "--cacheblend-recompute-ratio", "1.5"],
        capture_output=True, text=True, timeout=300,
    )
    assert result.returncode != 0
    assert "--cacheblend-recompute-ratio: BlendConfig.recompute_ratio must be in [0, 1]" in (
        result.stderr + result.stdout)
