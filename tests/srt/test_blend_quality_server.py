"""On 20 MuSiQue items, the server's blend at 15% is measurably closer to full prefill than reuse.

Fidelity is measured the way DESIGN.md's evaluation protocol asks, through the server itself
(:mod:`sglang_cacheblend.eval.teacher_forcing`): full prefill's 12-token greedy answer is scored
teacher-forced on the KV each mode left for the prompt alone (a follow-up request that reuses
that KV as its prefix), so the selector never sees the answer. Per position the distributions
are compared on the union of full prefill's top-20 ids (KL on that set plus "rest").

Prompts hold the first 2 passages of items 20-39 of musique_dev (~1.2k tokens), so the test
stays within a few minutes on 2 CPU cores; ``sglang-cacheblend eval`` runs the full protocol.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from sglang_cacheblend.eval.dataset import build_prompt, load_items, tokenize_prompt
from sglang_cacheblend.eval.metrics import mean_coarse_kl, mean_over_positions
from sglang_cacheblend.eval.teacher_forcing import FULL, REUSE, Mode, TeacherForcer

ITEMS = Path(__file__).parent.parent / "data" / "musique_dev_20_39.json"
BLEND_15 = Mode("blend@0.15", blend=True, recompute_ratio=0.15)
PASSAGES = 2  # ~1.2k-token prompts keep 20 items within a few minutes on 2 CPU cores
POSITIONS = 12
# The 20-item fixture runs inside the first test (~3 min on an idle 2-core machine; far longer
# when other work shares the cores).
pytestmark = pytest.mark.timeout(3000)


@pytest.fixture(scope="module")
def fidelity(server, model_path):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_path)
    encode = lambda text: tokenizer(text, add_special_tokens=False).input_ids  # noqa: E731
    scorer = TeacherForcer(server.base_url)
    kl = {REUSE.name: [], BLEND_15.name: []}
    logprob = {FULL.name: [], REUSE.name: [], BLEND_15.name: []}
    for item in load_items(ITEMS):
        prompt = tokenize_prompt(build_prompt(item, num_passages=PASSAGES), encode)
        reference = scorer.reference(prompt, max_new_tokens=POSITIONS, top_k=20)
        full = scorer.score(prompt, reference, FULL)
        logprob[FULL.name].append(mean_over_positions(full.token_logprobs))
        for mode in (REUSE, BLEND_15):
            scored = scorer.score(prompt, reference, mode, own_answer=False)
            assert scored.report is not None and scored.report["blended"], scored.report
            kl[mode.name].append(mean_coarse_kl(full.support_logprobs, scored.support_logprobs))
            logprob[mode.name].append(mean_over_positions(scored.token_logprobs))
        print(f"item {item.index}: KL reuse {kl[REUSE.name][-1]:.4f} "
              f"blend@0.15 {kl[BLEND_15.name][-1]:.4f}; answer logprob "
              + " ".join(f"{k} {v[-1]:.3f}" for k, v in logprob.items()), flush=True)
    means = ({k: mean_over_positions(v) for k, v in kl.items()},
             {k: mean_over_positions(v) for k, v in logprob.items()})
    print(f"\n{len(kl[REUSE.name])} items: mean KL {means[0]}, mean logprob {means[1]}")
    return means


# Measured with this test (fp32 server, the CPU default without native bf16): with V deviation
# (2026-11-25) mean KL reuse 0.0675 -> blend@0.15 0.0413 (39% of the gap), mean answer logprob
# full -0.438, reuse -0.535, blend@0.15 -0.519 (17% of the gap); with the question-lookahead
# default (2026-11-29) KL 0.0396 (41%), logprob -0.520. On these short 2-passage prompts the two
# rules are close; the margins assert the relation, at a third or less of what was measured: 10%
# of the KL gap, 5% of the logprob gap.


def test_blend_at_15_percent_has_lower_kl_to_full_prefill_than_reuse(fidelity):
    kl, _ = fidelity
    assert kl[BLEND_15.name] < 0.9 * kl[REUSE.name], kl


def test_blend_at_15_percent_gives_the_full_prefill_answer_a_higher_logprob(fidelity):
    _, logprob = fidelity
    gap = logprob[FULL.name] - logprob[REUSE.name]
    assert gap > 0, logprob  # full prefill's own greedy answer is likelier under full prefill
    assert logprob[BLEND_15.name] > logprob[REUSE.name] + 0.05 * gap, logprob
