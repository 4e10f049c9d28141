"""``sglang-cacheblend eval`` end to end on 2 items against the real server (not the figures)."""

from __future__ import annotations

import json
from pathlib import Path

import requests

from sglang_cacheblend.chunks import chunk_hints
from sglang_cacheblend.eval.quality.modes import QualityConfig
from sglang_cacheblend.eval.quality.report import summarize_modes, write_report
from sglang_cacheblend.eval.quality.run import evaluate

SAMPLE = Path(__file__).parent.parent / "data" / "musique_sample.json"


def test_eval_writes_a_well_formed_results_file(server, model_path, tmp_path):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_path)
    config = QualityConfig(data=SAMPLE, items=2, passages=2, max_new_tokens=6, ratios=(0.15,),
                           selectors=("k_deviation",))
    rows = evaluate(server.base_url, config,
                    lambda ids: tokenizer.decode(ids, skip_special_tokens=True),
                    lambda text: tokenizer(text, add_special_tokens=False).input_ids)
    modes = ["full", "reuse", "blend@0.15", "k_deviation@0.15", "gradual 0.3->0.15"]
    assert [(r["item"], r["mode"]) for r in rows] == [(i, m) for i in (0, 1) for m in modes]
    for row in rows:
        if row["mode"] == "full":
            assert row["kl"] == 0.0 and row["answer_matches_full"] and row["f1_vs_full"] == 1.0
            assert row["recomputed_fraction"] == 1.0
        else:
            assert row["kl"] >= 0.0 and 0.0 < row["recomputed_fraction"] < 1.0
            assert row["reused_tokens"] > 0
    fractions = {r["mode"]: r["recomputed_fraction"] for r in rows if r["item"] == 0}
    assert fractions["reuse"] < fractions["blend@0.15"] < fractions["gradual 0.3->0.15"]
    summary = summarize_modes(rows)
    write_report(tmp_path, config, rows, summary, "test")
    saved = json.loads((tmp_path / "quality.json").read_text())
    assert saved["config"]["items"] == 2 and len(saved["rows"]) == len(rows)
    assert saved["provenance"]["git"]["commit"]
    for name in ("quality.csv", "quality.md", "quality_kl_vs_ratio.png", "quality_gap.png"):
        assert (tmp_path / name).stat().st_size > 0


def test_a_bad_per_request_selector_is_a_400_and_the_server_keeps_serving(server):
    body = {"input_ids": list(range(100, 400)), "sampling_params": {"max_new_tokens": 1},
            "kv_hints": chunk_hints([(10, 290)], selector="no_such_rule")}
    response = requests.post(server.base_url + "/generate", json=body, timeout=120)
    assert response.status_code == 400 and "selector must be one of" in response.text
    body["kv_hints"] = chunk_hints([(10, 290)], recompute_ratio=0.1, gradual=[[1, 0.3], [8, 0.2]])
    response = requests.post(server.base_url + "/generate", json=body, timeout=120)
    assert response.status_code == 400 and "gradual must end at" in response.text
    body["kv_hints"] = chunk_hints([(10, 290)])
    assert requests.post(server.base_url + "/generate", json=body, timeout=600).status_code == 200


def test_eval_scores_context_families_on_chunks_precomputed_after_their_own_contexts(
        server, model_path):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_path)
    config = QualityConfig(data=SAMPLE, items=2, passages=2, max_new_tokens=6, ratios=(),
                           selectors=(), gradual_end_layer=None, families=("random:1", "own"))
    rows = evaluate(server.base_url, config,
                    lambda ids: tokenizer.decode(ids, skip_special_tokens=True),
                    lambda text: tokenizer(text, add_special_tokens=False).input_ids)
    modes = ["full", "reuse", "random-1 reuse", "random-1 blend@0.15",
             "own (upper bound) reuse", "own (upper bound) blend@0.15"]
    assert [(r["item"], r["mode"]) for r in rows] == [(i, m) for i in (0, 1) for m in modes]
    for row in rows:
        if row["mode"] not in ("full", "reuse"):  # blended on the family's precomputed chunks
            assert 0.0 < row["recomputed_fraction"] < 1.0 and row["reused_tokens"] > 0, row
            assert row["precompute_s"] > 0 and row["context_tokens"] > 0
            assert row["chunks_prefilled_in_place"] == 0  # every chunk came from its family
    summary = summarize_modes(rows)
    # Each chunk computed after the prompt's other passages is closer to full prefill's KV
    # than a chunk computed alone: the upper bound must beat standalone reuse.
    assert summary["own (upper bound) reuse"]["kl"] < summary["reuse"]["kl"]
