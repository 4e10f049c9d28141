"""The blended forward, end to end over transformers Llama-family models.

Invariants: ratio 1.0 equals a full prefill; with exact cached KV any ratio equals a
full prefill; ratio 0 recomputes only uncached rows after the check layer; and on real data a
15% recompute is closer to full prefill than plain reuse.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from sglang_cacheblend.blend.forward import blended_prefill, extend, full_prefill
from sglang_cacheblend.blend.hf_llama import HFLlamaOps
from sglang_cacheblend.blend.offline import blend_prompt, chunk_kv, run_blend
from sglang_cacheblend.config import BlendConfig

SAMPLE = Path(__file__).parent.parent / "data" / "musique_sample.json"


def _tiny(arch: str, seed: int):
    import transformers

    torch.manual_seed(seed)
    common = dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512)
    if arch == "llama":
        model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**common, rope_theta=1e4))
    elif arch == "qwen2":
        model = transformers.Qwen2ForCausalLM(transformers.Qwen2Config(**common, rope_theta=1e6))
    else:
        model = transformers.MistralForCausalLM(
            transformers.MistralConfig(**common, rope_theta=1e4, sliding_window=None))
    return model.float().eval()


def _hf_last_logits(model, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(ids[None]).logits[0, -1].float()


@pytest.mark.parametrize("arch", ["llama", "qwen2", "mistral"])
@pytest.mark.parametrize("seed", [0, 1])
def test_full_prefill_matches_transformers(arch, seed):
    model = _tiny(arch, seed)
    ids = torch.randint(0, 256, (37 + 11 * seed,))
    ours = full_prefill(HFLlamaOps(model), ids, torch.arange(ids.numel()), torch.float32)
    torch.testing.assert_close(ours.logits, _hf_last_logits(model, ids), atol=2e-4, rtol=1e-4)


def _chunked_prompt(model, seed: int, sizes=(9, 1, 23, 14)):
    """prefix + chunks (one-token chunk included) + suffix, chunk KV computed standalone."""
    g = torch.Generator().manual_seed(seed)
    ops = HFLlamaOps(model)
    sink, prefix, suffix = (torch.randint(0, 256, (n,), generator=g) for n in (2, 5, 6))
    chunks = [chunk_kv(ops, sink, torch.randint(0, 256, (n,), generator=g), torch.float32)
              for n in sizes]
    prefix_kv = full_prefill(ops, prefix, torch.arange(prefix.numel()), torch.float32)
    prompt = blend_prompt(ops, ops.rotary, prefix_kv, prefix, chunks, suffix, torch.float32)
    return ops, prompt


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
@pytest.mark.parametrize("selector", ["v_deviation", "k_deviation"])
def test_ratio_one_equals_full_prefill(arch, selector):
    model = _tiny(arch, 3)
    ops, prompt = _chunked_prompt(model, 3)
    result = run_blend(ops, prompt, BlendConfig(recompute_ratio=1.0, selector=selector))
    torch.testing.assert_close(result.logits, _hf_last_logits(model, prompt.input_ids),
                               atol=2e-4, rtol=1e-4)
    assert result.recomputed_rows == result.full_rows


@pytest.mark.parametrize("ratio", [0.0, 0.15, 0.5])
def test_exact_cached_kv_gives_full_prefill_at_any_ratio(ratio):
    model = _tiny("llama", 4)
    ops = HFLlamaOps(model)
    ids = torch.randint(0, 256, (60,))
    positions = torch.arange(60)
    full = full_prefill(ops, ids, positions, torch.float32)
    reuse = torch.ones(60, dtype=torch.bool)
    reuse[-7:] = False
    result = blended_prefill(ops, ids, positions, reuse, full.k, full.v,
                             BlendConfig(recompute_ratio=ratio, check_layer=1))
    torch.testing.assert_close(result.logits, full.logits, atol=2e-4, rtol=1e-4)
    torch.testing.assert_close(result.k, full.k, atol=2e-4, rtol=1e-4)


def test_ratio_zero_recomputes_only_uncached_rows_and_keeps_cached_kv():
    model = _tiny("llama", 5)
    ops, prompt = _chunked_prompt(model, 5)
    config = BlendConfig(recompute_ratio=0.0, check_layer=1)
    result = run_blend(ops, prompt, config)
    n, layers = prompt.input_ids.numel(), ops.num_layers
    uncached = int((~prompt.reuse_mask).sum())
    assert result.recomputed_rows == 2 * n + (layers - 2) * uncached
    # Past the check layer the reused rows keep exactly the realigned cached KV.
    torch.testing.assert_close(result.k[2:, prompt.reuse_mask], prompt.cached_k[2:, prompt.reuse_mask])
    # It is not a full prefill: chunks were computed without each other.
    assert not torch.allclose(result.logits, _hf_last_logits(model, prompt.input_ids), atol=1e-3)


def test_gradual_filtering_costs_more_than_single_check_at_same_target():
    model = _tiny("llama", 6)
    ops, prompt = _chunked_prompt(model, 6, sizes=(40, 30, 50))
    single = run_blend(ops, prompt, BlendConfig(recompute_ratio=0.15, check_layer=1))
    gradual = run_blend(ops, prompt, BlendConfig.linear(0.3, 0.15, 1, 3))
    assert gradual.recomputed_rows > single.recomputed_rows


def test_extend_after_prefix_equals_prefill_of_the_whole():
    model = _tiny("llama", 7)
    ops = HFLlamaOps(model)
    ids = torch.randint(0, 256, (40,))
    head = full_prefill(ops, ids[:30], torch.arange(30), torch.float32)
    logits = extend(ops, head.k, head.v, ids[30:])
    with torch.no_grad():
        expected = model(ids[None]).logits[0, 29:].float()
    torch.testing.assert_close(logits, expected[1:], atol=2e-4, rtol=1e-4)


def _kl(p_logits: torch.Tensor, q_logits: torch.Tensor) -> float:
    p = p_logits.log_softmax(-1)
    return float((p.exp() * (p - q_logits.log_softmax(-1))).sum(-1).mean())


def test_recompute_at_15_percent_is_closer_to_full_prefill_than_reuse(model_path):
    """On real passages and the embedded model: continuation KL to full prefill, teacher-forced
    on the blended prompt KV, is lower at ratio 0.15 than at ratio 0 (plain reuse)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_path)
    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32).eval()
    ops = HFLlamaOps(model)
    encode = lambda text: torch.tensor(tokenizer(text, add_special_tokens=False).input_ids)  # noqa: E731
    sink = encode("<|im_start|>system\n")
    prefix = encode("<|im_start|>system\nAnswer the question from the passages.<|im_end|>\n"
                    "<|im_start|>user\n")
    kl = {0.0: [], 0.15: []}
    for item in json.loads(SAMPLE.read_text())[:2]:
        chunks = [chunk_kv(ops, sink, encode(c["text"][:1200] + "\n\n"), torch.float32)
                  for c in item["ctxs"][:3]]
        suffix = encode(f"Question: {item['question']}<|im_end|>\n<|im_start|>assistant\n")
        prefix_kv = full_prefill(ops, prefix, torch.arange(prefix.numel()), torch.float32)
        prompt = blend_prompt(ops, ops.rotary, prefix_kv, prefix, chunks, suffix, torch.float32)
        full = run_blend(ops, prompt, BlendConfig(recompute_ratio=1.0))
        answer = [int(full.logits.argmax())]
        for _ in range(7):  # greedy continuation of the full prefill, 8 tokens
            step = extend(ops, full.k, full.v, torch.tensor(answer))
            answer.append(int(step[-1].argmax()))
        forced = torch.tensor(answer[:-1])
        full_scores = torch.cat([full.logits[None], extend(ops, full.k, full.v, forced)])
        for ratio in kl:
            blended = run_blend(ops, prompt, BlendConfig(recompute_ratio=ratio))
            scores = torch.cat([blended.logits[None], extend(ops, blended.k, blended.v, forced)])
            kl[ratio].append(_kl(full_scores, scores))
    mean = {r: sum(v) / len(v) for r, v in kl.items()}
    print(f"continuation KL to full prefill: {mean}")
    assert mean[0.0] > 1e-3, mean  # reuse really deviates
    assert mean[0.15] < 0.95 * mean[0.0], mean
