"""The default selector against the paper's rule on real passages with the embedded model.

On 5 held-out musique items (``tests/data/musique_5.json``, not among the sweep items that
chose the default) the default ``BlendConfig`` (question lookahead at layer 1, 15%) must close
more of the reuse-to-full-prefill KL gap than V deviation (the paper's rule) at the same 15%
budget, as it does in the sweeps (``docs/results/selector_sweep_lookahead.md``). KL is measured
as in the sweep: mean KL(full || mode) over the full prefill's greedy continuation,
teacher-forced on the KV the prompt alone produced.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch

from sglang_cacheblend.blend.forward import extend, extend_with_kv, full_prefill
from sglang_cacheblend.blend.hf_llama import HFLlamaOps
from sglang_cacheblend.blend.offline import blend_prompt, chunk_kv, run_blend
from sglang_cacheblend.config import BlendConfig

DATA = Path(__file__).parent.parent / "data" / "musique_5.json"
PASSAGES = 4  # whole passages: a ~2.3k-token prompt, the sweep's shape
TOKENS = 16

# Measured with this test's own code on these 5 items (4 whole passages, 16 tokens, fp32; the
# test prints them): the share of the KL gap the default (question lookahead) and V deviation
# recover at 15%. The margin asserted is half the measured difference: the test fails if the
# advantage shrinks by more than half, not on noise-level drift. Per-item KL (reuse, default,
# V deviation): item 40 .0451 .0269 .0330; 41 .0544 .0286 .0502; 42 .0175 .0130 .0127;
# 43 .1250 .0835 .1483; 44 .0411 .0202 .0225. The default is ahead on 4 of the 5 items.
MEASURED_GAP_DEFAULT = 0.392
MEASURED_GAP_V_DEVIATION = 0.058


def _greedy(ops, k, v, first_logits, tokens: int, stop: int) -> list[int]:
    out = [int(first_logits.argmax())]
    fed = 0
    while len(out) < tokens and out[-1] != stop:
        step = extend_with_kv(ops, k, v, torch.tensor(out[fed:]))
        k, v = torch.cat([k, step.k], dim=1), torch.cat([v, step.v], dim=1)
        fed = len(out)
        out.append(int(step.logits[-1].argmax()))
    return out


def _logprobs(ops, result, continuation: list[int]) -> torch.Tensor:
    logits = torch.cat([result.logits[None], extend(ops, result.k, result.v,
                                                    torch.tensor(continuation[:-1]))])
    return logits.double().log_softmax(-1)


@pytest.fixture
def one_thread():
    """One torch thread for this test: on a shared 2-core machine two threads spin against the
    other work (measured 700 s for this test with two threads, 144 s with one, load ~5)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_default_selector_beats_v_deviation_at_15_percent(model_path, one_thread):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_path)
    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32).eval()
    ops = HFLlamaOps(model)

    def encode(text: str) -> torch.Tensor:
        return torch.tensor(tokenizer(text, add_special_tokens=False).input_ids)

    sink = torch.tensor([tokenizer.bos_token_id])  # the server's sink (chunks.sink_ids)
    prefix = encode("<|im_start|>system\nAnswer the question from the passages.<|im_end|>\n"
                    "<|im_start|>user\n")
    prefix_kv = full_prefill(ops, prefix, torch.arange(prefix.numel()), torch.float32)
    default = BlendConfig()
    assert default.recompute_ratio == 0.15
    assert default.selector != "v_deviation"
    modes = {
        "reuse": BlendConfig(recompute_ratio=0.0),
        "default": default,
        "v_deviation": dataclasses.replace(default, selector="v_deviation"),
    }
    kl: dict[str, list[float]] = {name: [] for name in modes}
    for item in json.loads(DATA.read_text()):
        chunks = [chunk_kv(ops, sink, encode(c["text"] + "\n\n"), torch.float32)
                  for c in item["ctxs"][:PASSAGES]]
        suffix = encode(f"Question: {item['question']}<|im_end|>\n<|im_start|>assistant\n")
        prompt = blend_prompt(ops, ops.rotary, prefix_kv, prefix, chunks, suffix, torch.float32)
        full = run_blend(ops, prompt, BlendConfig(recompute_ratio=1.0))
        continuation = _greedy(ops, full.k, full.v, full.logits, TOKENS, tokenizer.eos_token_id)
        p = _logprobs(ops, full, continuation)
        for name, config in modes.items():
            q = _logprobs(ops, run_blend(ops, prompt, config), continuation)
            kl[name].append(float((p.exp() * (p - q)).sum(-1).mean()))
    mean = {name: sum(v) / len(v) for name, v in kl.items()}
    gap = {name: 1 - mean[name] / mean["reuse"] for name in modes}
    print(f"per-item KL {kl}\nmean KL {mean}\ngap recovered {gap}")
    assert mean["reuse"] > 1e-3, mean  # there is a gap to close
    margin = (MEASURED_GAP_DEFAULT - MEASURED_GAP_V_DEVIATION) / 2
    assert margin > 0
    assert gap["default"] > gap["v_deviation"] + margin, gap
