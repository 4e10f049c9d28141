"""BlendPlan: plan once, run per layer; single check, gradual filtering, ratio 0 and 1, cost."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from sglang_cacheblend.blend import BlendPlan, SelectionInputs, selection_budget
from sglang_cacheblend.config import BlendConfig

HEADS, DIM = 2, 4
V_DEV = "v_deviation"  # the inputs below carry V deviations only (no suffix, no lookahead)


def _layer_inputs(plan: BlendPlan, layer: int, deviation: torch.Tensor) -> SelectionInputs:
    """Inputs for the plan's rows at ``layer`` whose V deviation per row is ``deviation[row]``."""
    rows = plan.rows(layer)
    cached = torch.zeros(rows.numel(), HEADS, DIM)
    fresh_v = cached.clone()
    fresh_v[:, 0, 0] = deviation[rows].sqrt()
    return SelectionInputs(cached, fresh_v, cached, cached, plan.reuse_mask[rows])


def _run(plan: BlendPlan, deviations: list[torch.Tensor]) -> list[torch.Tensor]:
    """Drive the plan layer by layer; returns the rows computed at every layer."""
    seen = []
    for layer in range(plan.num_layers):
        seen.append(plan.rows(layer))
        if plan.is_selection_layer(layer):
            plan.update(layer, _layer_inputs(plan, layer, deviations[layer]))
    return seen


def _mask(n: int, suffix: int, seed: int, miss_rate: float = 0.1) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    mask = torch.rand(n, generator=gen) >= miss_rate
    mask[n - suffix :] = False
    return mask


def test_single_check_layer():
    n, layers = 200, 6
    mask = _mask(n, suffix=20, seed=0)
    cfg = BlendConfig(recompute_ratio=0.15, check_layer=1, selector=V_DEV)
    plan = BlendPlan(cfg, mask, layers)
    dev = [torch.rand(n) for _ in range(layers)]
    seen = _run(plan, dev)
    full = torch.arange(n)
    assert torch.equal(seen[0], full) and torch.equal(seen[1], full)
    k = selection_budget(0.15, int(mask.sum()), cfg.min_selected_tokens)
    chosen = seen[2]
    assert int(mask[chosen].sum()) == k
    assert set(torch.nonzero(~mask).flatten().tolist()) <= set(chosen.tolist())
    assert all(torch.equal(rows, chosen) for rows in seen[2:])
    # the chosen reused rows are the top-k of layer 1's deviation
    top = torch.argsort(torch.where(mask, dev[1], -1.0), descending=True, stable=True)[:k]
    assert set(top.tolist()) == set(chosen[mask[chosen]].tolist())
    assert plan.recomputed_rows == 2 * n + (layers - 2) * chosen.numel()
    assert plan.full_rows == n * layers


@settings(max_examples=30, deadline=None)
@given(
    seed=st.integers(0, 10_000),
    n=st.integers(1, 300),
    start=st.sampled_from([0.5, 0.3, 0.15]),
    end=st.sampled_from([0.15, 0.05, 0.0]),
    end_layer=st.integers(1, 6),
)
def test_gradual_filtering_shrinks_and_rescores(seed, n, start, end, end_layer):
    layers = 8
    mask = _mask(n, suffix=min(n, 5), seed=seed, miss_rate=0.05)
    cfg = BlendConfig.linear(max(start, end), end, check_layer=1, end_layer=end_layer,
                             selector=V_DEV)
    plan = BlendPlan(cfg, mask, layers)
    gen = torch.Generator().manual_seed(seed)
    dev = [torch.rand(n, generator=gen) for _ in range(layers)]
    seen = _run(plan, dev)
    forced = set(torch.nonzero(~mask).flatten().tolist())
    n_reused = int(mask.sum())
    steps = dict(cfg.schedule)
    for layer in range(1, layers):
        prev, cur = set(seen[layer - 1].tolist()), set(seen[layer].tolist())
        assert cur <= prev and forced <= cur
        if layer - 1 in steps:
            want = min(
                selection_budget(steps[layer - 1], n_reused, cfg.min_selected_tokens),
                int(mask[seen[layer - 1]].sum()),
            )
            kept = seen[layer][mask[seen[layer]]]
            assert kept.numel() == want
            # re-scored on that layer's deviation among the still-selected rows
            pool = seen[layer - 1][mask[seen[layer - 1]]]
            if 0 < want < pool.numel():
                assert (
                    dev[layer - 1][kept].min()
                    >= dev[layer - 1][sorted(set(pool.tolist()) - set(kept.tolist()))].max()
                )
        else:
            assert cur == prev
    assert plan.recomputed_rows == sum(rows.numel() for rows in seen)


def test_ratio_one_recomputes_everything_and_ratio_zero_reuses_everything():
    n, layers = 50, 4
    mask = _mask(n, suffix=7, seed=1)
    dev = [torch.rand(n) for _ in range(layers)]
    full = _run(BlendPlan(BlendConfig(recompute_ratio=1.0), mask, layers), dev)
    assert all(torch.equal(rows, torch.arange(n)) for rows in full)
    reuse = _run(
        BlendPlan(BlendConfig(recompute_ratio=0.0, min_selected_tokens=8), mask, layers), dev
    )
    assert all(torch.equal(rows, torch.nonzero(~mask).flatten()) for rows in reuse[2:])


def test_none_cached_and_all_cached():
    layers = 3
    none = BlendPlan(BlendConfig(), torch.zeros(10, dtype=torch.bool), layers)
    assert all(torch.equal(rows, torch.arange(10)) for rows in _run(none, [torch.rand(10)] * 3))
    everything = BlendPlan(
        BlendConfig(recompute_ratio=0.0), torch.ones(10, dtype=torch.bool), layers
    )
    assert _run(everything, [torch.rand(10)] * 3)[2].numel() == 0
    assert everything.recomputed_rows == 20


@pytest.mark.parametrize("minimum, want", [(0, 0), (1, 1)])
def test_one_token_request(minimum, want):
    plan = BlendPlan(BlendConfig(min_selected_tokens=minimum, selector=V_DEV),
                     torch.ones(1, dtype=torch.bool), 3)
    assert _run(plan, [torch.rand(1)] * 3)[2].numel() == want


def test_check_layer_zero_and_determinism():
    n = 64
    mask = _mask(n, suffix=4, seed=5)
    dev = [torch.rand(n) for _ in range(3)]
    cfg = BlendConfig(recompute_ratio=0.25, check_layer=0, selector="k_deviation")
    a = _run(BlendPlan(cfg, mask, 3), dev)
    b = _run(BlendPlan(cfg, mask, 3), dev)
    assert torch.equal(a[0], torch.arange(n)) and a[1].numel() < n
    assert all(torch.equal(x, y) for x, y in zip(a, b))


def test_plan_misuse_raises():
    mask = torch.ones(8, dtype=torch.bool)
    with pytest.raises(ValueError, match="num_layers"):
        BlendPlan(BlendConfig(check_layer=4), mask, 4)
    with pytest.raises(ValueError, match="reuse_mask"):
        BlendPlan(BlendConfig(), torch.ones(8), 4)
    plan = BlendPlan(BlendConfig(selector=V_DEV), mask, 4)
    assert plan.decided_through == 1
    with pytest.raises(RuntimeError, match="update"):
        plan.rows(2)
    with pytest.raises(ValueError, match="layer"):
        plan.rows(4)
    dev = torch.rand(8)
    with pytest.raises(ValueError, match="selection layer"):
        plan.update(0, _layer_inputs(plan, 0, dev))
    short = SelectionInputs(*(torch.zeros(3, HEADS, DIM),) * 4, reuse_mask=mask[:3])
    with pytest.raises(ValueError, match="rows"):
        plan.update(1, short)
    flipped = _layer_inputs(plan, 1, dev)
    flipped = SelectionInputs(
        flipped.fresh_k, flipped.fresh_v, flipped.cached_k, flipped.cached_v, ~flipped.reuse_mask
    )
    with pytest.raises(ValueError, match="reuse_mask"):
        plan.update(1, flipped)
    plan.update(1, _layer_inputs(plan, 1, dev))
    assert plan.decided_through == 3 and not plan.is_selection_layer(1)
