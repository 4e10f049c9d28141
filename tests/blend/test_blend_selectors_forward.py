"""The new selectors inside the blended forward, over tiny random Llama/Qwen2 models.

Invariants for every rule: ratio 1.0 reproduces full prefill and ratio 0.0 is plain reuse
(whatever the rule); the selection runs at check layer 0 and under gradual schedules with the
cost the plan promises; and what ``blend_layers`` hands a selector is right: the suffix's
queries and the keys outside the rows make question attention equal to the model's own
attention probabilities where the KV is exact.
"""

from __future__ import annotations

import pytest
import torch

from sglang_cacheblend.blend import plan as plan_module
from sglang_cacheblend.blend import selection_budget
from sglang_cacheblend.blend.forward import suffix_length
from sglang_cacheblend.blend.hf_llama import HFLlamaOps
from sglang_cacheblend.blend.offline import run_blend
from sglang_cacheblend.blend.registry import build_selector
from sglang_cacheblend.config import BlendConfig
from tests.blend.test_blend_forward import _chunked_prompt, _hf_last_logits, _tiny
from tests.blend.test_blend_selectors import NEW_RULES


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
@pytest.mark.parametrize("selector", NEW_RULES)
def test_ratio_one_equals_full_prefill(arch, selector):
    model = _tiny(arch, 11)
    ops, prompt = _chunked_prompt(model, 11)
    for config in (BlendConfig(recompute_ratio=1.0, selector=selector),
                   BlendConfig(recompute_ratio=1.0, check_layer=0, selector=selector)):
        result = run_blend(ops, prompt, config)
        torch.testing.assert_close(result.logits, _hf_last_logits(model, prompt.input_ids),
                                   atol=2e-4, rtol=1e-4)
        assert result.recomputed_rows == result.full_rows


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
@pytest.mark.parametrize("selector", NEW_RULES)
def test_ratio_zero_is_plain_reuse_whatever_the_rule(arch, selector):
    model = _tiny(arch, 12)
    ops, prompt = _chunked_prompt(model, 12)
    reuse = run_blend(ops, prompt, BlendConfig(recompute_ratio=0.0, selector="v_deviation"))
    result = run_blend(ops, prompt, BlendConfig(recompute_ratio=0.0, selector=selector))
    assert torch.equal(result.logits, reuse.logits)
    assert torch.equal(result.k, reuse.k) and torch.equal(result.v, reuse.v)
    n, layers = prompt.input_ids.numel(), ops.num_layers
    uncached = int((~prompt.reuse_mask).sum())
    assert result.recomputed_rows == 2 * n + (layers - 2) * uncached
    mask = prompt.reuse_mask
    torch.testing.assert_close(result.k[2:, mask], prompt.cached_k[2:, mask])


@pytest.mark.parametrize("selector", NEW_RULES)
def test_layer_zero_and_gradual_selection_cost_what_the_plan_says(selector):
    model = _tiny("llama", 13)
    ops, prompt = _chunked_prompt(model, 13, sizes=(40, 30, 50))
    n, layers = prompt.input_ids.numel(), ops.num_layers
    n_reused = int(prompt.reuse_mask.sum())
    forced = n - n_reused
    at_zero = run_blend(ops, prompt, BlendConfig(recompute_ratio=0.2, check_layer=0,
                                                 selector=selector))
    assert at_zero.recomputed_rows == n + (layers - 1) * (selection_budget(0.2, n_reused, 1)
                                                          + forced)
    config = BlendConfig.linear(0.4, 0.2, 0, 2, selector=selector)
    gradual = run_blend(ops, prompt, config)
    k0, k1, k2 = (selection_budget(ratio, n_reused, 1) for _, ratio in config.schedule)
    # layer 0: all rows; layer 1: step 0's rows; layer 2: step 1's; layers 3..: step 2's
    assert gradual.recomputed_rows == n + (k0 + forced) + (k1 + forced) + (layers - 3) * (
        k2 + forced)
    assert torch.isfinite(at_zero.logits).all() and torch.isfinite(gradual.logits).all()


class _Recorder:
    """Wraps a real selector and keeps every (inputs, scores) pair it was asked for."""

    def __init__(self, name: str) -> None:
        self.inner = build_selector(name)
        self.reads_suffix = self.inner.reads_suffix
        self.reads_lookahead = self.inner.reads_lookahead
        self.lookahead_first_layer = self.inner.lookahead_first_layer
        self.calls: list[tuple[object, torch.Tensor]] = []

    def score(self, inputs):
        scores = self.inner.score(inputs)
        self.calls.append((inputs, scores))
        return scores


def _recording(monkeypatch, name: str) -> _Recorder:
    recorder = _Recorder(name)
    monkeypatch.setattr(plan_module, "build_selector", lambda _name: recorder)
    return recorder


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
@pytest.mark.parametrize("check_layer", [0, 1])
def test_question_attention_equals_the_models_attention_at_the_check_layer(
        monkeypatch, arch, check_layer):
    """Layers 0..check_layer run on every row, so at the check layer the KV and the suffix's
    queries are the full prefill's: the rule's score must be the model's own attention
    probabilities, summed over heads and suffix rows."""
    model = _tiny(arch, 14)
    ops, prompt = _chunked_prompt(model, 14)
    recorder = _recording(monkeypatch, "question_attention")
    run_blend(ops, prompt, BlendConfig(recompute_ratio=0.3, check_layer=check_layer,
                                       selector="question_attention"))
    (inputs, scores), = recorder.calls
    n = prompt.input_ids.numel()
    num_suffix = suffix_length(prompt.reuse_mask)
    assert num_suffix == 6 and inputs.num_suffix == num_suffix  # the question of the prompt
    assert inputs.context_k.shape[0] == 0  # every row computed: nothing outside them
    model.set_attn_implementation("eager")
    with torch.no_grad():
        probs = model(prompt.input_ids[None], output_attentions=True).attentions[check_layer][0]
    want = probs[:, n - num_suffix:, :].sum(dim=(0, 1))
    mask = prompt.reuse_mask
    torch.testing.assert_close(scores[mask], want[mask], atol=1e-5, rtol=1e-4)


def test_gradual_steps_see_the_keys_outside_their_rows(monkeypatch):
    """At a later gradual step only the kept rows are computed; the selector must still get
    the suffix's softmax over every stored key: recorded scores equal a dense softmax of the
    recorded suffix queries against the layer's final K store (kept rows fresh, others
    cached), causal by position."""
    model = _tiny("llama", 15)
    ops, prompt = _chunked_prompt(model, 15, sizes=(30, 25, 40))
    recorder = _recording(monkeypatch, "question_attention")
    result = run_blend(ops, prompt, BlendConfig.linear(0.5, 0.2, 1, 3,
                                                       selector="question_attention"))
    assert len(recorder.calls) == 3
    n = prompt.input_ids.numel()
    group = ops.num_q_heads // ops.num_kv_heads
    for layer, (inputs, scores) in zip((1, 2, 3), recorder.calls):
        rows = inputs.positions  # positions 0..n-1 here, so positions are the row indices
        assert inputs.context_k.shape[0] == n - rows.numel()
        if layer > 1:
            assert rows.numel() < n
        keys = result.k[layer].repeat_interleave(group, dim=1).double()  # (n, Hq, D)
        q = inputs.suffix_q.double()  # (S, Hq, D)
        logits = torch.einsum("shd,nhd->hsn", q, keys) / ops.head_dim**0.5
        suffix_pos = torch.arange(n - q.shape[0], n)
        logits = logits.masked_fill(torch.arange(n)[None, :] > suffix_pos[:, None], -torch.inf)
        want = logits.softmax(-1).sum(dim=(0, 1))[rows]
        mask = inputs.reuse_mask
        torch.testing.assert_close(scores[mask].double(), want[mask], atol=1e-5, rtol=1e-4)


def test_extend_with_kv_decodes_one_token_at_a_time_exactly():
    """Greedy decoding on appended KV (what the selector sweep does) equals re-running the
    whole continuation after the prompt's KV."""
    from sglang_cacheblend.blend.forward import extend, extend_with_kv, full_prefill

    model = _tiny("llama", 16)
    ops = HFLlamaOps(model)
    ids = torch.randint(0, 256, (30,))
    head = full_prefill(ops, ids, torch.arange(30), torch.float32)
    first = extend_with_kv(ops, head.k, head.v, torch.tensor([5, 9]))
    k = torch.cat([head.k, first.k], dim=1)
    v = torch.cat([head.v, first.v], dim=1)
    step = extend_with_kv(ops, k, v, torch.tensor([7]))
    whole = extend(ops, head.k, head.v, torch.tensor([5, 9, 7]))
    torch.testing.assert_close(first.logits, whole[:2], atol=2e-5, rtol=1e-5)
    torch.testing.assert_close(step.logits[0], whole[2], atol=2e-5, rtol=1e-5)
    assert first.k.shape == (ops.num_layers, 2, ops.num_kv_heads, ops.head_dim)
