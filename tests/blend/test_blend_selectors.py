"""The question-attention family of selectors, checked against plain float64 loops.

Each new rule: scores equal an independent reference; deterministic; the suffix (and any other
uncached row) is always kept; the budget is exact; the rule runs through ``BlendPlan`` with the
selection at layer 0 and with gradual schedules; a missing ``suffix_q`` fails loudly.
"""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from sglang_cacheblend.blend import (
    SELECTORS,
    BlendPlan,
    SelectionInputs,
    build_selector,
    select_top_rows,
    selection_budget,
)
from sglang_cacheblend.blend.forward import suffix_length
from sglang_cacheblend.config import BlendConfig

NEW_RULES = (
    "question_attention",
    "question_attention_cached",
    "attention_x_v_deviation",
    "attention_plus_k_deviation",
    "question_output_error",
)
KV_HEADS, Q_HEADS, DIM = 2, 6, 8


def _inputs(n: int = 40, suffix: int = 5, context: int = 7, seed: int = 0, miss: float = 0.1,
            dtype: torch.dtype = torch.float32) -> SelectionInputs:
    """Random rows in position order: reused rows, a few uncached ones, then the suffix; rows at
    scattered positions after a cached prefix of ``context`` keys."""
    gen = torch.Generator().manual_seed(seed)
    kv = [torch.randn(n, KV_HEADS, DIM, generator=gen).to(dtype) for _ in range(4)]
    mask = torch.rand(n, generator=gen) >= miss
    mask[n - suffix:] = False
    mask[n - suffix - 1] = True  # the suffix starts right after a reused row
    positions = context + torch.sort(torch.randperm(3 * n, generator=gen)[:n]).values
    suffix_q = torch.randn(suffix, Q_HEADS, DIM, generator=gen).to(dtype)
    context_k = torch.randn(context, KV_HEADS, DIM, generator=gen).to(dtype)
    return SelectionInputs(*kv, reuse_mask=mask, suffix_q=suffix_q, positions=positions,
                           context_k=context_k)


def _ref_probs(inp: SelectionInputs, cached: bool) -> list[list[list[float]]]:
    """p[h][s][j] element by element in Python floats (float64): suffix row s, query head h."""
    n, s_len = inp.num_rows, inp.num_suffix
    group = Q_HEADS // KV_HEADS
    keys = [
        (inp.cached_k if cached and bool(inp.reuse_mask[j]) else inp.fresh_k)[j].double()
        for j in range(n)
    ]
    ctx = [inp.context_k[c].double() for c in range(inp.context_k.shape[0])]
    pos = inp.positions.tolist()
    out = []
    for h in range(Q_HEADS):
        kvh = h // group
        per_s = []
        for s in range(s_len):
            q = inp.suffix_q[s, h].double()
            p_s = pos[n - s_len + s]
            logits = [float(q @ keys[j][kvh]) / math.sqrt(DIM) if pos[j] <= p_s else -math.inf
                      for j in range(n)]
            ctx_logits = [float(q @ c[kvh]) / math.sqrt(DIM) for c in ctx]
            z = sum(math.exp(x) for x in logits + ctx_logits)
            per_s.append([math.exp(x) / z for x in logits])
        out.append(per_s)
    return out


def _ref_scores(name: str, inp: SelectionInputs) -> torch.Tensor:
    n = inp.num_rows
    probs = _ref_probs(inp, cached=False)
    mass = [sum(probs[h][s][j] for h in range(Q_HEADS) for s in range(inp.num_suffix))
            for j in range(n)]
    dv = [float((inp.fresh_v[j].double() - inp.cached_v[j].double()).square().sum())
          for j in range(n)]
    dk = [float((inp.fresh_k[j].double() - inp.cached_k[j].double()).square().sum())
          for j in range(n)]
    if name == "question_attention":
        return torch.tensor(mass, dtype=torch.float64)
    if name == "question_attention_cached":
        stale = _ref_probs(inp, cached=True)
        return torch.tensor([sum(stale[h][s][j] for h in range(Q_HEADS)
                                 for s in range(inp.num_suffix)) for j in range(n)],
                            dtype=torch.float64)
    if name == "attention_x_v_deviation":
        return torch.tensor([m * math.sqrt(d) for m, d in zip(mass, dv)], dtype=torch.float64)
    if name == "attention_plus_k_deviation":
        reused = [j for j in range(n) if bool(inp.reuse_mask[j])]

        def ranks(values: list[float]) -> dict[int, float]:
            order = sorted(reused, key=lambda j: (values[j], j))  # ties: earlier row lower
            return {j: (r + 1) / len(reused) for r, j in enumerate(order)}

        ra, rk = ranks(mass), ranks(dk)
        return torch.tensor([ra.get(j, 0.0) + rk.get(j, 0.0) for j in range(n)],
                            dtype=torch.float64)
    assert name == "question_output_error"
    cached = _ref_probs(inp, cached=True)
    group = Q_HEADS // KV_HEADS
    out = []
    for j in range(n):
        v = inp.fresh_v[j].double()
        v_old = inp.cached_v[j].double() if bool(inp.reuse_mask[j]) else v
        total = 0.0
        for h in range(Q_HEADS):
            for s in range(inp.num_suffix):
                diff = probs[h][s][j] * v[h // group] - cached[h][s][j] * v_old[h // group]
                total += float(diff.norm())
        out.append(total)
    return torch.tensor(out, dtype=torch.float64)


@pytest.mark.parametrize("name", NEW_RULES)
@pytest.mark.parametrize("seed", [0, 1])
def test_scores_match_a_plain_loop(name, seed):
    inp = _inputs(seed=seed)
    got = build_selector(name).score(inp)
    assert got.dtype == torch.float32 and got.shape == (inp.num_rows,)
    want = _ref_scores(name, inp).float()
    mask = inp.reuse_mask  # only reused rows' scores are read
    torch.testing.assert_close(got[mask], want[mask], rtol=1e-4, atol=1e-6)


def test_attention_mass_is_a_share_of_the_real_softmax():
    """Without other keys every suffix row spreads exactly 1 per head over what it sees; keys
    outside the rows (context_k) take their share, so the rows then get less."""
    inp = _inputs(context=0, seed=2)
    bare = SelectionInputs(inp.fresh_k, inp.fresh_v, inp.cached_k, inp.cached_v, inp.reuse_mask,
                           suffix_q=inp.suffix_q, positions=inp.positions)
    total = build_selector("question_attention").score(bare).sum()
    torch.testing.assert_close(total, torch.tensor(float(Q_HEADS * inp.num_suffix)))
    with_ctx = _inputs(context=50, seed=2)
    assert build_selector("question_attention").score(with_ctx).sum() < total


def test_question_attention_is_causal_inside_the_suffix():
    """Earlier suffix rows cannot see the last row: a key on the last row that every query
    would attend to takes mass from the last suffix row only (at most 1 per query head)."""
    inp = _inputs(seed=3, context=0)
    fresh_k = inp.fresh_k.clone()
    group = Q_HEADS // KV_HEADS
    for h in range(KV_HEADS):
        fresh_k[-1, h] = 50 * inp.suffix_q[:, h * group: (h + 1) * group].sum((0, 1))
    spiked = SelectionInputs(fresh_k, inp.fresh_v, inp.cached_k, inp.cached_v, inp.reuse_mask,
                             suffix_q=inp.suffix_q, positions=inp.positions)
    rule = build_selector("question_attention")
    before = rule.score(inp)[inp.reuse_mask].sum()
    after = rule.score(spiked)[inp.reuse_mask].sum()
    assert 0.5 < float(before - after) <= Q_HEADS + 1e-4  # the last row's heads moved, no more


@pytest.mark.parametrize("name", NEW_RULES)
def test_deterministic_and_budget_exact_with_forced_rows(name):
    inp = _inputs(n=80, suffix=6, seed=4, miss=0.2)
    selector = build_selector(name)
    scores = selector.score(inp)
    assert torch.equal(scores, build_selector(name).score(inp))
    n_reused = int(inp.reuse_mask.sum())
    for ratio in (0.05, 0.15, 0.5, 1.0):
        k = selection_budget(ratio, n_reused, 1)
        rows = select_top_rows(scores, inp.reuse_mask, k, inp.positions)
        chosen = torch.zeros(inp.num_rows, dtype=torch.bool)
        chosen[rows] = True
        assert int((chosen & inp.reuse_mask).sum()) == k
        assert chosen[~inp.reuse_mask].all()  # the suffix and missed rows always stay
        assert chosen[-inp.num_suffix:].all()


def test_only_question_rules_ask_for_the_suffix():
    """blend_layers gathers the suffix queries and outside keys only for rules that read them."""
    assert all(SELECTORS[name].reads_suffix for name in NEW_RULES)
    assert not SELECTORS["v_deviation"].reads_suffix
    assert not SELECTORS["k_deviation"].reads_suffix


@pytest.mark.parametrize("name", NEW_RULES)
def test_missing_suffix_queries_fail_loudly(name):
    inp = _inputs()
    bare = SelectionInputs(inp.fresh_k, inp.fresh_v, inp.cached_k, inp.cached_v, inp.reuse_mask)
    with pytest.raises(ValueError, match="suffix_q"):
        build_selector(name).score(bare)


def test_exact_cache_scores_zero_output_error_and_attention_does_not():
    """Rows whose cached KV equals the fresh KV cost nothing to reuse: the output-error rule
    scores them 0, while plain question attention still ranks them by what the question reads."""
    inp = _inputs(seed=5)
    exact = SelectionInputs(inp.fresh_k, inp.fresh_v, inp.fresh_k.clone(), inp.fresh_v.clone(),
                            inp.reuse_mask, suffix_q=inp.suffix_q, positions=inp.positions,
                            context_k=inp.context_k)
    err = build_selector("question_output_error").score(exact)
    assert float(err[exact.reuse_mask].abs().max()) < 1e-5
    assert float(build_selector("question_attention").score(exact)[exact.reuse_mask].min()) > 0


def test_the_most_read_stale_row_ranks_first():
    """A reused row the question attends to heavily under fresh and cached keys alike (its key
    aligned with every suffix query) and whose V moved wins under all the attention rules."""
    inp = _inputs(seed=6, context=0)
    fresh_k, cached_k = inp.fresh_k.clone(), inp.cached_k.clone()
    target = 3
    assert bool(inp.reuse_mask[target])
    group = Q_HEADS // KV_HEADS
    for h in range(KV_HEADS):
        aligned = 4 * inp.suffix_q[:, h * group: (h + 1) * group].sum((0, 1))
        fresh_k[target, h] = aligned
        cached_k[target, h] = 0.5 * aligned  # stale, yet still read
    fresh_v = inp.fresh_v.clone()
    fresh_v[target] += 5.0
    spiked = SelectionInputs(fresh_k, fresh_v, cached_k, inp.cached_v, inp.reuse_mask,
                             suffix_q=inp.suffix_q, positions=inp.positions)
    for name in NEW_RULES:
        scores = build_selector(name).score(spiked)
        assert select_top_rows(scores, spiked.reuse_mask, 1).tolist()[0] == target, name


def test_suffix_length():
    assert suffix_length(torch.tensor([True, True, False, True, False, False])) == 2
    assert suffix_length(torch.tensor([False, False])) == 2
    assert suffix_length(torch.tensor([True, False])) == 1


def _drive(plan: BlendPlan, inputs_at) -> list[torch.Tensor]:
    """Run a plan layer by layer with SelectionInputs built for the rows of each layer."""
    seen = []
    for layer in range(plan.num_layers):
        seen.append(plan.rows(layer))
        if plan.is_selection_layer(layer):
            plan.update(layer, inputs_at(layer, plan.rows(layer)))
    return seen


@pytest.mark.parametrize("name", NEW_RULES)
@pytest.mark.parametrize("check_layer", [0, 1])
def test_rules_run_in_plans_at_layer_zero_and_gradually(name, check_layer):
    n, layers, suffix = 120, 6, 8
    mask = torch.ones(n, dtype=torch.bool)
    mask[n - suffix:] = False
    mask[10:13] = False  # a missed chunk
    per_layer = [_inputs(n=n, suffix=suffix, context=0, seed=10 + i) for i in range(layers)]

    def inputs_at(layer: int, rows: torch.Tensor) -> SelectionInputs:
        full = per_layer[layer]
        outside = torch.ones(n, dtype=torch.bool)
        outside[rows] = False  # as in blend_layers: rows not computed here keep cached KV
        return SelectionInputs(
            full.fresh_k[rows], full.fresh_v[rows], full.cached_k[rows], full.cached_v[rows],
            mask[rows], suffix_q=full.suffix_q, positions=torch.arange(n)[rows],
            context_k=full.cached_k[outside],
        )

    n_reused = int(mask.sum())
    for config in (
        BlendConfig(recompute_ratio=0.15, check_layer=check_layer, selector=name),
        BlendConfig.linear(0.3, 0.15, check_layer, 4, selector=name),
    ):
        seen = _drive(BlendPlan(config, mask, layers), inputs_at)
        again = _drive(BlendPlan(config, mask, layers), inputs_at)
        assert all(torch.equal(a, b) for a, b in zip(seen, again))
        assert all(torch.equal(r, torch.arange(n)) for r in seen[: check_layer + 1])
        final = seen[-1]
        assert int(mask[final].sum()) == selection_budget(0.15, n_reused, 1)
        assert set(torch.nonzero(~mask).flatten().tolist()) <= set(final.tolist())
        for before, after in itertools.pairwise(seen):
            assert set(after.tolist()) <= set(before.tolist())
