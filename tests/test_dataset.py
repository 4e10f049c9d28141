"""Loading musique-format files (with clear errors) and the one shared RAG prompt."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from sglang_cacheblend.chunks import CHUNK_CLOSE, CHUNK_OPEN, split_chunks, strip_markers
from sglang_cacheblend.dataset import QAItem, build_prompt, load_items, tokenize_prompt

SAMPLE = Path(__file__).resolve().parent / "data" / "musique_sample.json"
GOOD = {"question": "Who?", "answers": ["Ann"], "ctxs": [{"title": "", "text": "Ann did."}]}


def _write(tmp_path: Path, data: object) -> Path:
    path = tmp_path / "data.json"
    path.write_text(data if isinstance(data, str) else json.dumps(data))
    return path


def test_load_items_reads_the_sample():
    items = load_items(SAMPLE)
    assert len(items) == 3
    assert all(len(item.passages) == 4 and item.answers for item in items)
    assert items[1].index == 1


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ("{not json", "not valid JSON"),
        ({"question": "q"}, "non-empty JSON list"),
        ([], "non-empty JSON list"),
        (["text"], "item 0: expected an object"),
        ([{k: v for k, v in GOOD.items() if k != "answers"}], "item 0: missing field 'answers'"),
        ([GOOD, {**GOOD, "question": 3}], "item 1: 'question' must be a str"),
        ([{**GOOD, "question": "  "}], "'question' is empty"),
        ([{**GOOD, "answers": []}], "'answers' must be a non-empty list"),
        ([{**GOOD, "ctxs": []}], "'ctxs' is empty"),
        ([{**GOOD, "ctxs": [{"title": ""}]}], r"ctxs\[0\] must be an object with a str 'text'"),
        ([{**GOOD, "ctxs": [{"text": "a"}, {"text": " "}]}], r"ctxs\[1\].text is empty"),
    ],
)
def test_load_items_names_the_problem(tmp_path: Path, data: object, message: str):
    with pytest.raises(ValueError, match=message):
        load_items(_write(tmp_path, data))


ITEM = QAItem(
    0, "Where was Ann born?", ("Paris",), ("Ann was born in Paris.", "Bob lives in Rome.")
)


def test_build_prompt_is_the_benchmark_chatml_prompt():
    prompt = build_prompt(ITEM)
    assert prompt.text() == (
        "<|im_start|>system\nAnswer the question from the passages.<|im_end|>\n<|im_start|>user\n"
        "Ann was born in Paris.\n\nBob lives in Rome.\n\n"
        "Question: Where was Ann born?<|im_end|>\n<|im_start|>assistant\n"
    )
    assert build_prompt(ITEM, num_passages=1).passages == ("Ann was born in Paris.\n\n",)
    assert "Answer briefly." in build_prompt(ITEM, instruction="Answer briefly.").prefix
    with pytest.raises(ValueError, match="num_passages"):
        build_prompt(ITEM, num_passages=3)


def test_marked_text_wraps_each_passage_and_strips_back_to_the_plain_text():
    prompt = build_prompt(ITEM)
    marked = prompt.marked_text()
    assert marked.count(CHUNK_OPEN) == 2 and marked.count(CHUNK_CLOSE) == 2
    segments = split_chunks(marked)
    assert [s.text for s in segments if s.is_chunk] == list(prompt.passages)
    assert strip_markers(segments) == prompt.text()
    assert segments == prompt.segments()


def test_reordered_and_tokenized_spans():
    prompt = build_prompt(ITEM)
    flipped = prompt.reordered([1, 0])
    assert flipped.passages == prompt.passages[::-1]
    with pytest.raises(ValueError, match="permutation"):
        prompt.reordered([0, 0])

    chunked = tokenize_prompt(prompt, lambda text: [ord(c) for c in text])
    assert "".join(map(chr, chunked.input_ids)) == prompt.text()
    assert [
        "".join(map(chr, chunked.input_ids[start:end])) for start, end in chunked.spans
    ] == list(prompt.passages)
