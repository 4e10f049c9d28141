"""The demo's code path against a real server: what it prints is what happened.

Uses the session ``server`` (``--enable-cacheblend``). Speed is reported, not asserted (timed
tests are no speed claims); what is asserted is that CacheBlend hit every chunk and recomputed
a fraction of the rows, and that full prefill and the prefix cache did not blend.
"""

from __future__ import annotations

import json

import requests

from sglang_cacheblend import demo


def test_demo_compares_the_three_modes_and_prints_them(server, model_path):
    from transformers import AutoTokenizer

    passages, question = demo.load_passages(None, None)
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    rows = demo.compare(server.base_url, passages[:3], question, tokenizer, progress=False)
    full, prefix, blend = rows
    assert [r.mode for r in rows] == ["full prefill", "SGLang prefix cache", "CacheBlend"]
    assert full.chunk_hits is None and prefix.chunk_hits is None
    assert blend.blended is True and blend.chunk_hits == blend.chunks == 3
    assert 0 < blend.recomputed_share < 0.5
    assert prefix.cached_tokens > 0 and full.cached_tokens == 0
    assert full.prompt_tokens == prefix.prompt_tokens == blend.prompt_tokens
    assert all(r.ttft_s > 0 and r.answer for r in rows)
    table = demo.render(rows, question)
    print(table)
    assert "3/3" in table and question in table and "CacheBlend's answer equals" in table
    example = requests.post(server.base_url + "/generate", timeout=300, json={
        "text": demo.EXAMPLE_TEXT, "sampling_params": {"max_new_tokens": 4}})
    assert example.status_code == 200, example.text  # the --keep-server example works
    print(f"TTFT full {full.ttft_s:.2f} s, prefix {prefix.ttft_s:.2f} s, "
          f"CacheBlend {blend.ttft_s:.2f} s (reported, not asserted)")


def test_demo_reads_the_passage_formats_a_user_gives(tmp_path):
    listed = tmp_path / "list.json"
    listed.write_text(json.dumps(["First passage.", "Second passage."]))
    assert demo.load_passages(listed, "Q?") == (["First passage.", "Second passage."], "Q?")
    text = tmp_path / "passages.txt"
    text.write_text("One.\n\nTwo.\n\n\nThree.\n")
    assert demo.load_passages(text, "Q?")[0] == ["One.", "Two.", "Three."]
    passages, question = demo.load_passages(demo.DEMO_DATA, None)
    assert len(passages) == 4 and question.endswith("?")
    try:
        demo.load_passages(listed, None)
    except ValueError as exc:
        assert "--question" in str(exc)
    else:
        raise AssertionError("a passage list without a question must be refused")
