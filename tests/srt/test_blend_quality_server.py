"""On 20 MuSiQue items, the server's default blend at 15% is measurably closer to full prefill
than reuse, than V deviation and than the same blend on standalone chunk KV.

Fidelity is measured the way DESIGN.md's evaluation protocol asks, through the server itself
(:mod:`sglang_cacheblend.eval.teacher_forcing`): full prefill's 12-token greedy answer is scored
teacher-forced on the KV each mode left for the prompt alone (a follow-up request that reuses
that KV as its prefix), so the selector never sees the answer. Per position the distributions
are compared on the union of full prefill's top-20 ids (KL on that set plus "rest").

The server runs with its defaults: chunk KV computed after the shipped chunk context
(``--cacheblend-chunk-context builtin``) and the ``question_lookahead`` selector. The baselines
run on the same server with ``chunk_context: "none"`` (standalone chunk KV, the paper's). Its
dtype is pinned to fp32, where the margins below were measured: bf16 rounding moves the
answer's log-probs by ~0.1 on its own (on a bf16 server the answer-logprob claim failed), so
these are claims about the blend, not the arithmetic. What bf16 keeps of them is checked on the
session ``server`` (the shipped defaults in the dtype ``serve`` picks) on a few items.

Prompts hold the first 2 passages of items 20-39 of musique_dev (~1.2k tokens), so the test
stays within a few minutes on 2 CPU cores; ``sglang-cacheblend eval`` runs the full protocol.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from sglang_cacheblend.dataset import build_prompt, load_items, tokenize_prompt
from sglang_cacheblend.eval.metrics import mean_coarse_kl, mean_over_positions
from sglang_cacheblend.eval.teacher_forcing import FULL, Mode, TeacherForcer
from tests.conftest import FLOAT32, SHIPPED_BLEND_ARGS, running_server

ITEMS = Path(__file__).parent.parent / "data" / "musique_dev_20_39.json"
REUSE = Mode("reuse", blend=True, recompute_ratio=0.0, chunk_context="none")
DEFAULT_15 = Mode("blend@0.15", blend=True, recompute_ratio=0.15)
V_DEVIATION_15 = Mode("v_deviation@0.15", blend=True, recompute_ratio=0.15,
                      selector="v_deviation", chunk_context="none")
STANDALONE_15 = Mode("standalone blend@0.15", blend=True, recompute_ratio=0.15,
                     chunk_context="none")
BLENDED = (REUSE, DEFAULT_15, V_DEVIATION_15, STANDALONE_15)
PASSAGES = 2  # ~1.2k-token prompts keep 20 items within a few minutes on 2 CPU cores
POSITIONS = 12
# The 20-item fixture runs inside the first test (~6 min on an idle 2-core machine; far longer
# when other work shares the cores).
pytestmark = pytest.mark.timeout(3000)


def _measure(base_url: str, model_path, items, modes) -> tuple[dict, dict]:
    """Mean KL to full prefill per mode, and the mean answer log-prob per mode (and full)."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_path)
    encode = lambda text: tokenizer(text, add_special_tokens=False).input_ids  # noqa: E731
    kl = {mode.name: [] for mode in modes}
    logprob = {mode.name: [] for mode in (FULL, *modes)}
    scorer = TeacherForcer(base_url)
    for item in items:
        prompt = tokenize_prompt(build_prompt(item, num_passages=PASSAGES), encode)
        reference = scorer.reference(prompt, max_new_tokens=POSITIONS, top_k=20)
        full = scorer.score(prompt, reference, FULL)
        logprob[FULL.name].append(mean_over_positions(full.token_logprobs))
        for mode in modes:
            scored = scorer.score(prompt, reference, mode, own_answer=False)
            assert scored.report is not None and scored.report["blended"], scored.report
            in_context = scored.report.get("chunk_context_tokens") is not None
            assert in_context == (mode is DEFAULT_15), (mode, scored.report)
            kl[mode.name].append(mean_coarse_kl(full.support_logprobs, scored.support_logprobs))
            logprob[mode.name].append(mean_over_positions(scored.token_logprobs))
        print(f"item {item.index}: KL " + " ".join(f"{k} {v[-1]:.4f}" for k, v in kl.items())
              + "; answer logprob " + " ".join(f"{k} {v[-1]:.3f}" for k, v in logprob.items()),
              flush=True)
    means = ({k: mean_over_positions(v) for k, v in kl.items()},
             {k: mean_over_positions(v) for k, v in logprob.items()})
    print(f"\n{len(kl[modes[0].name])} items: mean KL {means[0]}, mean logprob {means[1]}")
    return means


@pytest.fixture(scope="module")
def fidelity(model_path, tmp_path_factory):
    with running_server(model_path, tmp_path_factory.mktemp("quality"),
                        [*SHIPPED_BLEND_ARGS, *FLOAT32]) as server:
        return _measure(server.base_url, model_path, load_items(ITEMS), BLENDED)


# Measured with this test (fp32 server, 2026-12-01): mean KL reuse 0.0675; the default
# (context-conditioned chunk KV + question_lookahead) 0.0312 (54% of the gap), V deviation on
# standalone chunk KV 0.0414 (39%), the lookahead on standalone chunk KV 0.0396 (41%); mean
# answer logprob full -0.438, reuse -0.535, default -0.511. The margins assert the relations at
# about a third of what was measured: 5 points of the gap over V deviation, 4 over standalone.
MARGIN_OVER_V_DEVIATION = 0.05
MARGIN_OVER_STANDALONE = 0.04


def test_blend_at_15_percent_has_lower_kl_to_full_prefill_than_reuse(fidelity):
    kl, _ = fidelity
    assert kl[DEFAULT_15.name] < 0.9 * kl[REUSE.name], kl


def test_blend_at_15_percent_gives_the_full_prefill_answer_a_higher_logprob(fidelity):
    _, logprob = fidelity
    gap = logprob[FULL.name] - logprob[REUSE.name]
    assert gap > 0, logprob  # full prefill's own greedy answer is likelier under full prefill
    assert logprob[DEFAULT_15.name] > logprob[REUSE.name] + 0.05 * gap, logprob


def test_the_default_beats_v_deviation_and_standalone_chunk_kv(fidelity):
    kl, _ = fidelity
    gap = {name: 1 - value / kl[REUSE.name] for name, value in kl.items()}
    assert gap[DEFAULT_15.name] > gap[V_DEVIATION_15.name] + MARGIN_OVER_V_DEVIATION, gap
    assert gap[DEFAULT_15.name] > gap[STANDALONE_15.name] + MARGIN_OVER_STANDALONE, gap


SERVED_DTYPE_ITEMS = 5  # ~1.5 min: the served-dtype check is a second pass over a few items


def test_in_the_served_dtype_the_blend_at_15_percent_has_lower_kl_than_reuse(server, model_path):
    """bf16 (where ``serve`` picks it) keeps the blend's advantage in KL, the measure that
    rounding noise of ~0.1 in single log-probs does not swamp."""
    kl, _ = _measure(server.base_url, model_path, load_items(ITEMS)[:SERVED_DTYPE_ITEMS],
                     (REUSE, DEFAULT_15))
    assert kl[DEFAULT_15.name] < 0.9 * kl[REUSE.name], kl
