"""The suffix lookahead and the ``question_lookahead`` rule, over tiny random Llama/Qwen2 models.

What must hold: the lookahead's masses are the question's real attention in every later layer
on the cached KV (checked against the reuse pass, which computes exactly those suffix rows);
its provisional suffix K/V never leak into the result (the blend equals the same rows selected
without a lookahead); ratio 1.0 / 0.0 still give full prefill / plain reuse; the cost counts the
lookahead's rows; the budget is exact; a missing ``lookahead_mass`` fails loudly.
"""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch

from sglang_cacheblend.blend import plan as plan_module
from sglang_cacheblend.blend import selection_budget
from sglang_cacheblend.blend.forward import suffix_length
from sglang_cacheblend.blend.lookahead import attention_mass
from sglang_cacheblend.blend.offline import run_blend
from sglang_cacheblend.blend.registry import build_selector
from sglang_cacheblend.blend.selection import Selector
from sglang_cacheblend.config import BlendConfig
from tests.blend.test_blend_forward import _chunked_prompt, _hf_last_logits, _tiny
from tests.blend.test_blend_selectors import _inputs

RULE = "question_lookahead"


def test_attention_mass_equals_a_float64_loop():
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(5, 6, 8, generator=gen)
    keys = torch.randn(12, 2, 8, generator=gen)
    q_pos = torch.tensor([7, 8, 9, 10, 11])
    got = attention_mass(q, keys, q_pos)
    want = [0.0] * 12
    for s in range(5):
        for h in range(6):
            logits = [float(q[s, h].double() @ keys[j, h // 3].double()) / math.sqrt(8)
                      for j in range(int(q_pos[s]) + 1)]
            z = sum(math.exp(x) for x in logits)
            for j, x in enumerate(logits):
                want[j] += math.exp(x) / z
    torch.testing.assert_close(got.double(), torch.tensor(want, dtype=torch.float64),
                               atol=1e-5, rtol=1e-5)
    assert got.sum().item() == pytest.approx(5 * 6, rel=1e-5)  # each (query, head) sums to 1


class _Recorder:
    """Wraps a rule (or fixed scores) and keeps the inputs and scores of every selection."""

    def __init__(self, inner: Selector) -> None:
        self.inner = inner
        self.reads_suffix = inner.reads_suffix
        self.reads_lookahead = inner.reads_lookahead
        self.lookahead_first_layer = inner.lookahead_first_layer
        self.calls: list[tuple[object, torch.Tensor]] = []

    def score(self, inputs):
        scores = self.inner.score(inputs)
        self.calls.append((inputs, scores))
        return scores


class _FixedScores(Selector):
    """Scores given by position, reading nothing (so no lookahead runs)."""

    name = "fixed"

    def __init__(self, by_position: torch.Tensor) -> None:
        self.by_position = by_position

    def score(self, inputs):
        return self.by_position[inputs.positions.long()]


def _use(monkeypatch, selector) -> None:
    monkeypatch.setattr(plan_module, "build_selector", lambda _name: selector)


class _QRecordingOps:
    """Delegates to real ops and records the queries each layer computes."""

    def __init__(self, ops) -> None:
        self._ops = ops
        self.queries: dict[int, torch.Tensor] = {}

    def __getattr__(self, name):
        return getattr(self._ops, name)

    def qkv(self, layer, hidden, positions):
        q, k, v = self._ops.qkv(layer, hidden, positions)
        self.queries[layer] = q
        return q, k, v


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
@pytest.mark.parametrize("check_layer", [0, 1])
def test_lookahead_is_the_questions_attention_on_the_cached_kv(monkeypatch, arch, check_layer):
    """At ratio 0 the blend runs exactly the suffix through the layers after the check on cached
    KV, which is what the lookahead does: its masses must equal that pass's attention
    probabilities in the layers the rule reads (the second half: 2 and 3 of 4). From check
    layer 0 the lookahead runs layer 1 with the fused kernel, which must not change layers 2-3."""
    model = _tiny(arch, 21)
    ops, prompt = _chunked_prompt(model, 21, sizes=(20, 15, 25))
    recorder = _Recorder(build_selector(RULE))
    _use(monkeypatch, recorder)
    run_blend(ops, prompt, BlendConfig(recompute_ratio=0.3, check_layer=check_layer,
                                       selector=RULE))
    (inputs, scores), = recorder.calls
    mass = inputs.lookahead_mass
    assert mass.shape == (ops.num_layers, prompt.input_ids.numel())
    assert torch.equal(mass[:2], torch.zeros_like(mass[:2]))  # before the layers the rule reads

    monkeypatch.undo()
    recording = _QRecordingOps(ops)
    reuse = run_blend(recording, prompt, BlendConfig(recompute_ratio=0.0,
                                                     check_layer=check_layer))
    n = prompt.input_ids.numel()
    num_suffix = suffix_length(prompt.reuse_mask)
    group = ops.num_q_heads // ops.num_kv_heads
    suffix_pos = torch.arange(n - num_suffix, n)
    for layer in range(2, ops.num_layers):
        q = recording.queries[layer].double()  # only the suffix rows run at these layers
        assert q.shape[0] == num_suffix
        keys = reuse.k[layer].double().repeat_interleave(group, dim=1)
        logits = torch.einsum("shd,nhd->hsn", q, keys) / ops.head_dim**0.5
        logits = logits.masked_fill(torch.arange(n)[None, :] > suffix_pos[:, None], -torch.inf)
        want = logits.softmax(-1).sum(dim=(0, 1))
        torch.testing.assert_close(mass[layer].double(), want, atol=1e-5, rtol=1e-4)
    deep = mass[ops.num_layers // 2:].sum(0)
    torch.testing.assert_close(scores, deep)


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_lookahead_leaves_no_trace_in_the_blend(monkeypatch, arch):
    """The lookahead writes provisional suffix K/V; the blend must equal the same rows
    selected by a rule that reads nothing (no lookahead), bit for bit."""
    model = _tiny(arch, 22)
    ops, prompt = _chunked_prompt(model, 22, sizes=(20, 15, 25))
    config = BlendConfig(recompute_ratio=0.3, selector=RULE)
    recorder = _Recorder(build_selector(RULE))
    _use(monkeypatch, recorder)
    with_lookahead = run_blend(ops, prompt, config)
    (inputs, scores), = recorder.calls
    by_position = torch.zeros(prompt.input_ids.numel())
    by_position[inputs.positions.long()] = scores
    _use(monkeypatch, _FixedScores(by_position))
    without = run_blend(ops, prompt, config)
    assert torch.equal(with_lookahead.logits, without.logits)
    assert torch.equal(with_lookahead.k, without.k) and torch.equal(with_lookahead.v, without.v)
    num_suffix = suffix_length(prompt.reuse_mask)
    assert with_lookahead.recomputed_rows == without.recomputed_rows + num_suffix * (
        ops.num_layers - 2)


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_ratio_one_is_full_prefill_and_ratio_zero_is_reuse(arch):
    model = _tiny(arch, 23)
    ops, prompt = _chunked_prompt(model, 23)
    full = run_blend(ops, prompt, BlendConfig(recompute_ratio=1.0, selector=RULE))
    torch.testing.assert_close(full.logits, _hf_last_logits(model, prompt.input_ids),
                               atol=2e-4, rtol=1e-4)
    assert full.recomputed_rows == full.full_rows  # nothing to choose: no lookahead is run
    reuse = run_blend(ops, prompt, BlendConfig(recompute_ratio=0.0))
    result = run_blend(ops, prompt, BlendConfig(recompute_ratio=0.0, selector=RULE))
    assert torch.equal(result.logits, reuse.logits) and torch.equal(result.k, reuse.k)
    assert result.recomputed_rows == reuse.recomputed_rows


def test_budget_is_exact_deterministic_and_keeps_the_suffix(monkeypatch):
    model = _tiny("llama", 24)
    ops, prompt = _chunked_prompt(model, 24, sizes=(30, 25, 40))
    n, layers = prompt.input_ids.numel(), ops.num_layers
    n_reused = int(prompt.reuse_mask.sum())
    num_suffix = suffix_length(prompt.reuse_mask)
    forced = n - n_reused
    picked = []
    for _ in range(2):
        recorder = _Recorder(build_selector(RULE))
        _use(monkeypatch, recorder)
        result = run_blend(ops, prompt, BlendConfig(recompute_ratio=0.2, selector=RULE))
        k = selection_budget(0.2, n_reused, 1)
        assert result.recomputed_rows == 2 * n + (layers - 2) * (k + forced) + num_suffix * (
            layers - 2)
        picked.append((recorder.calls[0][1], result.logits))
    assert torch.equal(picked[0][0], picked[1][0]) and torch.equal(picked[0][1], picked[1][1])


def test_gradual_schedule_runs_a_lookahead_per_step():
    model = _tiny("llama", 25)
    ops, prompt = _chunked_prompt(model, 25, sizes=(30, 25, 40))
    n, layers = prompt.input_ids.numel(), ops.num_layers
    n_reused = int(prompt.reuse_mask.sum())
    forced = n - n_reused
    num_suffix = suffix_length(prompt.reuse_mask)
    config = BlendConfig.linear(0.5, 0.2, 1, 2, selector=RULE)
    result = run_blend(ops, prompt, config)
    k1, k2 = (selection_budget(r, n_reused, 1) for _, r in config.schedule)
    # layers 0-1: all rows; layer 2: step 1's; layer 3: step 2's; lookaheads after 1 and 2
    assert result.recomputed_rows == 2 * n + (k1 + forced) + (k2 + forced) + num_suffix * (
        (layers - 2) + (layers - 3))
    assert torch.isfinite(result.logits).all()


def test_missing_lookahead_mass_is_refused():
    with pytest.raises(ValueError, match="lookahead_mass"):
        build_selector(RULE).score(_inputs())


def test_lookahead_mass_shape_is_checked():
    inputs = _inputs(n=40)
    with pytest.raises(ValueError, match="lookahead_mass"):
        dataclasses.replace(inputs, lookahead_mass=torch.zeros(4, 39))
    ok = dataclasses.replace(inputs, lookahead_mass=torch.zeros(4, 40))
    assert ok.lookahead_mass.shape == (4, 40)
