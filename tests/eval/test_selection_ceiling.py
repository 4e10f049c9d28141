"""The oracle ceiling (`eval/selection_ceiling.py`) on a tiny random Llama: what it measures must
be what it says, so its figures can bound the selectors'."""

from __future__ import annotations

import torch

from sglang_cacheblend.blend.forward import blended_prefill
from sglang_cacheblend.config import BlendConfig
from sglang_cacheblend.eval.offline.fidelity import ItemContext, greedy, teacher_forced
from sglang_cacheblend.eval.offline.selection_ceiling import (
    deviation_ranking,
    evaluate_item,
    gradient_ranking,
)
from tests.blend.test_blend_forward import _chunked_prompt, _tiny


def _context(seed: int) -> tuple[object, ItemContext, object]:
    model = _tiny("llama", seed)
    ops, prompt = _chunked_prompt(model, seed, sizes=(20, 15, 25))
    positions = torch.arange(prompt.input_ids.numel())
    with torch.no_grad():
        full = blended_prefill(ops, prompt.input_ids, positions, prompt.reuse_mask,
                               prompt.cached_k, prompt.cached_v, BlendConfig(recompute_ratio=1.0))
        continuation = greedy(ops, full.k, full.v, full.logits, 6, set())
        logprobs = teacher_forced(ops, full.k, full.v, full.logits, continuation)
    ctx = ItemContext(0, prompt.input_ids, prompt.reuse_mask, prompt.cached_k, prompt.cached_v,
                      continuation, ("x",), logprobs, 0.0)
    return ops, ctx, full


def test_rankings_are_zero_where_the_cache_is_exact_and_positive_elsewhere():
    ops, ctx, full = _context(31)
    prefix = 5  # _chunked_prompt's exact prefix
    chunks = ctx.reuse_mask.clone()
    chunks[:prefix] = False
    for score in (deviation_ranking(full.k, full.v, ctx, 1),
                  gradient_ranking(ops, ctx, full.k, full.v, 1)):
        assert score.shape == ctx.reuse_mask.shape and torch.isfinite(score).all()
        assert torch.all(score[:prefix] < 1e-6 * score[chunks].max())
        assert (score[chunks] > 0).float().mean() > 0.9
    assert all(not p.requires_grad or p.grad is None for p in ops._model.parameters())


def test_oracles_bracket_reuse_and_full_prefill():
    ops, ctx, _ = _context(32)
    rows = evaluate_item(ops, ctx, budgets=[1.0, 0.3], selectors=["v_deviation"])
    kl = {(r["method"], r["budget"]): r["kl"] for r in rows}
    reuse = kl[("reuse", 0.0)]
    assert reuse > 1e-4
    for method in ("v_deviation", "deviation oracle, exact KV", "deviation oracle, recomputed",
                   "gradient oracle, exact KV", "gradient oracle, recomputed"):
        assert kl[(method, 1.0)] < 1e-6 * max(1.0, reuse), (method, kl[(method, 1.0)])
    # exact KV for 30% of the rows, chosen by the first-order effect, beats plain reuse
    assert kl[("gradient oracle, exact KV", 0.3)] < reuse
