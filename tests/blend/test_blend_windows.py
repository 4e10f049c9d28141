"""Contiguous-window recompute (``BlendConfig.recompute_window``): same budget, runs of rows."""

from __future__ import annotations

import pytest
import torch

from sglang_cacheblend.blend.budget import select_top_rows, select_top_windows
from sglang_cacheblend.blend.plan import BlendPlan
from sglang_cacheblend.blend.selection import SelectionInputs
from sglang_cacheblend.config import BlendConfig


def _runs(rows: list[int]) -> list[list[int]]:
    runs: list[list[int]] = []
    for row in rows:
        if runs and runs[-1][-1] == row - 1:
            runs[-1].append(row)
        else:
            runs.append([row])
    return runs


def test_windows_are_centred_on_the_best_rows_and_keep_the_budget():
    scores = torch.tensor([0.0, 5, 0, 0, 0, 0, 9, 0, 0, 0, 1, 0])
    mask = torch.ones(12, dtype=torch.bool)
    mask[11] = False  # the question: always kept, never counted
    assert select_top_windows(scores, mask, 6, 3).tolist() == [0, 1, 2, 5, 6, 7, 11]
    assert select_top_windows(scores, mask, 6, 1).tolist() == select_top_rows(
        scores, mask, 6).tolist()


@pytest.mark.parametrize("window", [2, 4, 8, 64])
def test_every_budget_is_met_exactly_with_runs_no_longer_than_needed(window):
    generator = torch.Generator().manual_seed(window)
    mask = torch.rand(300, generator=generator) > 0.1
    for budget in (0, 1, 7, 45, int(mask.sum())):
        scores = torch.rand(300, generator=generator)
        rows = select_top_windows(scores, mask, budget, window)
        assert rows.numel() == budget + int((~mask).sum())
        assert torch.equal(rows, torch.sort(rows).values) and rows.unique().numel() == rows.numel()
        dropped = torch.ones(300, dtype=torch.bool)
        dropped[rows] = False
        assert bool(mask[dropped].all())  # only reused rows are ever dropped


def test_windows_cluster_the_selection_where_scattered_rows_do_not():
    generator = torch.Generator().manual_seed(0)
    scores = torch.rand(400, generator=generator)
    mask = torch.ones(400, dtype=torch.bool)
    scattered = _runs(select_top_rows(scores, mask, 60).tolist())
    windowed = _runs(select_top_windows(scores, mask, 60, 6).tolist())
    assert len(windowed) <= 60 // 6 + 2 < len(scattered)
    # Each window holds its centre, one of the highest-scoring rows of its neighbourhood.
    best = int(torch.argmax(scores))
    assert any(best in run for run in windowed)


def test_bad_windows_are_refused():
    for bad in (0, -1, 1.5, True):
        with pytest.raises(ValueError, match="recompute_window"):
            BlendConfig(recompute_window=bad)
        with pytest.raises(ValueError, match="window"):
            select_top_windows(torch.zeros(3), torch.ones(3, dtype=torch.bool), 1, bad)


def test_the_plan_selects_windows_when_configured():
    mask = torch.ones(40, dtype=torch.bool)
    mask[-2:] = False
    scores = torch.zeros(40)
    scores[10], scores[30] = 5.0, 4.0
    rows = {}
    for window in (1, 4):
        config = BlendConfig(recompute_ratio=0.2, check_layer=0, selector="v_deviation",
                             recompute_window=window, min_reused_tokens=0)
        plan = BlendPlan(config, mask, num_layers=2, selector=_FixedScores(scores))
        current = plan.rows(0)
        zeros = torch.zeros(40, 1, 2)
        inputs = SelectionInputs(fresh_k=zeros, fresh_v=zeros, cached_k=zeros, cached_v=zeros,
                                 reuse_mask=mask[current])
        rows[window] = plan.update(0, inputs).tolist()
    assert len(rows[1]) == len(rows[4]) == 8 + 2
    assert {9, 10, 11, 29, 30, 31} <= set(rows[4]) and len(_runs(rows[4][:-2])) == 2


class _FixedScores:
    reads_suffix = False
    reads_lookahead = False

    def __init__(self, scores: torch.Tensor) -> None:
        self._scores = scores

    def score(self, inputs) -> torch.Tensor:
        return self._scores
