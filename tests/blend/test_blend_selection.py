"""HKVD selection: budget, top-k with forced rows and ties, the two deviation rules, registry."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from sglang_cacheblend.blend import (
    SELECTORS,
    SelectionInputs,
    Selector,
    build_selector,
    select_top_rows,
    selection_budget,
)


@pytest.mark.parametrize(
    "ratio, n, minimum, want",
    [
        (0.15, 100, 0, 15),
        (0.15, 3600, 0, 540),
        (0.25, 10, 0, 3),  # 2.5 rounds half up
        (0.24, 10, 0, 2),
        (0.29, 50, 0, 15),  # 14.5 exactly, although 0.29 * 50 == 14.4999... in floats
        (0.0, 100, 5, 0),  # ratio 0 is full reuse, the minimum does not apply
        (1.0, 7, 0, 7),
        (0.01, 10, 4, 4),  # minimum for short prompts
        (0.5, 3, 10, 3),  # capped at n
        (0.3, 0, 3, 0),  # nothing reused
        (0.15, 1, 0, 0),  # one-token chunk: round(0.15) = 0
        (0.15, 1, 1, 1),
    ],
)
def test_selection_budget_table(ratio, n, minimum, want):
    assert selection_budget(ratio, n, minimum) == want


@settings(max_examples=200, deadline=None)
@given(ratio=st.floats(0, 1), n=st.integers(0, 10_000), minimum=st.integers(0, 64))
def test_selection_budget_properties(ratio, n, minimum):
    k = selection_budget(ratio, n, minimum)
    assert 0 <= k <= n
    if ratio == 0:
        assert k == 0
    elif k > minimum and k < n:
        assert abs(k - ratio * n) <= 0.5 + 1e-9
    assert selection_budget(min(1.0, ratio + 0.01), n, minimum) >= k


@pytest.mark.parametrize("bad", [-0.1, 1.5, math.nan])
def test_selection_budget_rejects_bad_ratio(bad):
    with pytest.raises(ValueError, match="ratio"):
        selection_budget(bad, 10)


@settings(max_examples=60, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), n=st.integers(1, 300), data=st.data())
def test_select_top_rows_properties(seed, n, data):
    gen = torch.Generator().manual_seed(seed)
    reuse = torch.rand(n, generator=gen) < 0.8
    # coarse scores so ties happen
    scores = torch.randint(0, 5, (n,), generator=gen).float()
    k = data.draw(st.integers(0, int(reuse.sum())))
    rows = select_top_rows(scores, reuse, k)
    assert rows.dtype == torch.int64
    assert torch.equal(rows, torch.sort(rows).values) and rows.unique().numel() == rows.numel()
    chosen = torch.zeros(n, dtype=torch.bool)
    chosen[rows] = True
    assert chosen[~reuse].all()  # rows without cached KV are always kept
    assert int((chosen & reuse).sum()) == k
    picked, left = scores[chosen & reuse], scores[~chosen & reuse]
    if picked.numel() and left.numel():
        assert picked.min() >= left.max()
        # ties go to the earlier position
        tie = picked.min()
        tied_left = torch.nonzero(~chosen & reuse & (scores == tie)).flatten()
        tied_in = torch.nonzero(chosen & reuse & (scores == tie)).flatten()
        if tied_left.numel():
            assert tied_in.max() < tied_left.min()
    assert torch.equal(rows, select_top_rows(scores, reuse, k))  # deterministic


def test_ties_broken_by_given_positions():
    scores = torch.ones(6)
    reuse = torch.ones(6, dtype=torch.bool)
    assert select_top_rows(scores, reuse, 2).tolist() == [0, 1]
    positions = torch.tensor([50, 40, 30, 20, 10, 0])
    assert select_top_rows(scores, reuse, 2, positions).tolist() == [4, 5]


def test_select_top_rows_edges_and_errors():
    scores = torch.tensor([3.0, 1.0, 2.0])
    none_cached = torch.zeros(3, dtype=torch.bool)
    assert select_top_rows(scores, none_cached, 0).tolist() == [0, 1, 2]
    all_cached = torch.ones(3, dtype=torch.bool)
    assert select_top_rows(scores, all_cached, 0).tolist() == []
    assert select_top_rows(scores, all_cached, 3).tolist() == [0, 1, 2]
    assert select_top_rows(scores, all_cached, 1).tolist() == [0]
    with pytest.raises(ValueError, match="num_selected"):
        select_top_rows(scores, all_cached, 4)
    with pytest.raises(ValueError, match="NaN"):
        select_top_rows(torch.tensor([1.0, math.nan, 0.0]), all_cached, 1)
    with pytest.raises(ValueError, match="reuse_mask"):
        select_top_rows(scores, torch.ones(3), 1)
    with pytest.raises(ValueError, match="scores"):
        select_top_rows(scores.long(), all_cached, 1)


def _inputs(n=12, heads=3, dim=8, dtype=torch.float32, seed=0, **extra) -> SelectionInputs:
    gen = torch.Generator().manual_seed(seed)
    shape = (n, heads, dim)
    tensors = [torch.randn(shape, generator=gen).to(dtype) for _ in range(4)]
    mask = torch.ones(n, dtype=torch.bool)
    return SelectionInputs(*tensors, reuse_mask=mask, **extra)


def _loop_deviation(fresh: torch.Tensor, cached: torch.Tensor) -> list[float]:
    out = []
    for r in range(fresh.shape[0]):
        total = 0.0
        for a, b in zip(fresh[r].flatten().tolist(), cached[r].flatten().tolist()):
            total += (a - b) ** 2
        out.append(total)
    return out


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_v_and_k_deviation_scores(dtype):
    inp = _inputs(dtype=dtype, seed=3)
    v_scores = build_selector("v_deviation").score(inp)
    k_scores = build_selector("k_deviation").score(inp)
    assert v_scores.dtype == torch.float32 and v_scores.shape == (12,)
    want_v = torch.tensor(_loop_deviation(inp.fresh_v.float(), inp.cached_v.float()))
    want_k = torch.tensor(_loop_deviation(inp.fresh_k.float(), inp.cached_k.float()))
    torch.testing.assert_close(v_scores, want_v, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(k_scores, want_k, rtol=1e-5, atol=1e-5)


def test_v_rule_reads_only_v_and_k_rule_only_k():
    base = _inputs(seed=1)
    moved_k = SelectionInputs(
        base.fresh_k + 5, base.fresh_v, base.cached_k, base.cached_v, base.reuse_mask
    )
    assert torch.equal(
        build_selector("v_deviation").score(moved_k), build_selector("v_deviation").score(base)
    )
    assert not torch.equal(
        build_selector("k_deviation").score(moved_k), build_selector("k_deviation").score(base)
    )
    # the row whose V moved most is the top v_deviation pick
    fresh_v = base.cached_v.clone()
    fresh_v[7] += 3.0
    fresh_v[2] += 1.0
    spiked = SelectionInputs(base.fresh_k, fresh_v, base.cached_k, base.cached_v, base.reuse_mask)
    scores = build_selector("v_deviation").score(spiked)
    assert select_top_rows(scores, spiked.reuse_mask, 2).tolist() == [2, 7]


def test_registry():
    assert set(SELECTORS) == {
        "v_deviation",
        "k_deviation",
        "question_attention",
        "question_attention_cached",
        "attention_x_v_deviation",
        "attention_plus_k_deviation",
        "question_output_error",
        "question_lookahead",
    }
    for name, cls in SELECTORS.items():
        assert issubclass(cls, Selector) and cls.name == name
        assert isinstance(build_selector(name), cls)
    with pytest.raises(ValueError, match="unknown selector"):
        build_selector("attention_magic")
    with pytest.raises(TypeError):
        SELECTORS["x"] = SELECTORS["v_deviation"]  # type: ignore[index]


def test_selection_inputs_validation():
    good = _inputs()
    k, v = good.fresh_k, good.fresh_v
    with pytest.raises(ValueError, match="cached_v"):
        SelectionInputs(k, v, k, v[:5], good.reuse_mask)
    with pytest.raises(ValueError, match="fresh_k"):
        SelectionInputs(k.flatten(1), v, k, v, good.reuse_mask)
    with pytest.raises(ValueError, match="fresh_k"):
        SelectionInputs(k.long(), v, k, v, good.reuse_mask)
    with pytest.raises(ValueError, match="reuse_mask"):
        SelectionInputs(k, v, k, v, torch.ones(12))
    with pytest.raises(ValueError, match="suffix_q"):
        SelectionInputs(k, v, k, v, good.reuse_mask, suffix_q=torch.randn(4, 4, 8))
    with pytest.raises(ValueError, match="positions"):
        SelectionInputs(k, v, k, v, good.reuse_mask, positions=torch.arange(12.0))
    ok = SelectionInputs(
        k, v, k, v, good.reuse_mask, suffix_q=torch.randn(4, 9, 8), positions=torch.arange(12)
    )
    assert ok.num_rows == 12
