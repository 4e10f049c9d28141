"""Per-chunk contexts of the eval's context families: which passages each chunk is computed
after, and which it never is (the evaluated item's own retrieved list)."""

from __future__ import annotations

import pytest

from sglang_cacheblend.eval.context_families import Corpus, context_ids, parse_family
from sglang_cacheblend.dataset import QAItem
from sglang_cacheblend.eval.quality.modes import QualityConfig, modes_for

TOPICS = {
    "rivers": "the river flows through the valley to the sea past the old mill",
    "trains": "the train leaves the station at noon on the northern railway line",
    "bees": "bees collect nectar from flowers and make honey in the hive",
    "stars": "a star is a ball of plasma held together by its own gravity",
}


def _items() -> list[QAItem]:
    texts = list(TOPICS.values())
    return [
        QAItem(0, "q0", ("a",), (texts[0], texts[1] + " river sea valley")),
        QAItem(1, "q1", ("a",), (texts[2], texts[3], texts[0])),  # shares a passage with 0
        QAItem(2, "q2", ("a",), (texts[3] + " train railway station", "flowers and honey",
                                 "the sea and the valley river mill")),
    ]


def test_the_corpus_holds_each_passage_once_and_knows_whose_it_is():
    items = _items()
    corpus = Corpus(items)
    assert len(corpus) == 7
    own = {corpus.texts[i] for i in corpus.own(items[0])}
    assert own == set(items[0].passages)  # the rivers text item 1 shares too, once


def test_random_and_bm25_contexts_never_use_the_items_own_passages():
    items = _items()
    corpus = Corpus(items)
    item = items[0]
    for spec in (parse_family("random:2"), parse_family("bm25:2")):
        contexts = corpus.contexts(spec, item, item.passages)
        assert [len(c) for c in contexts] == [2, 2]
        for context in contexts:
            assert not set(context) & set(item.passages)
    again = corpus.contexts(parse_family("random:2"), item, item.passages)
    assert again == corpus.contexts(parse_family("random:2"), item, item.passages)  # seeded
    # BM25: the river chunk's closest foreign passage is the other river text, placed last.
    assert corpus.contexts(parse_family("bm25:2"), item, item.passages)[0][-1] == \
        "the sea and the valley river mill"
    with pytest.raises(ValueError, match="needs 9 passages"):
        corpus.contexts(parse_family("random:9"), item, item.passages)


def test_own_contexts_are_the_prompts_other_passages_in_order():
    items = _items()
    item = items[1]
    contexts = Corpus(items).contexts(parse_family("own"), item, item.passages)
    assert contexts[1] == [item.passages[0], item.passages[2]]
    assert context_ids(["ab", "c"], lambda text: list(text.encode())) == list(b"ab\n\nc\n\n")


@pytest.mark.parametrize("bad", ["bm25", "random:0", "own:3", "neighbours:2", "bm25:x", "fixed"])
def test_bad_family_specs_are_refused(bad):
    with pytest.raises(ValueError):
        parse_family(bad)


def test_family_modes_reuse_and_blend_at_the_main_ratio_and_label_the_upper_bound():
    config = QualityConfig(ratios=(0.15,), selectors=(), gradual_end_layer=None,
                           chunk_context="builtin", families=("random:3", "own"))
    modes = {m.name: m for m in modes_for(config)}
    assert modes["random-3 reuse"].context_family == "random-3"
    assert modes["random-3 reuse"].recompute_ratio == 0.0
    assert modes["random-3 blend@0.15"].recompute_ratio == 0.15
    assert modes["own (upper bound) blend@0.15"].context_family == "own"
    assert modes["ctx blend@0.15"].context_family is None
    assert not any(name.startswith("ctx random") for name in modes)


def test_fixed_contexts_are_the_shipped_paragraphs_before_every_chunk():
    from sglang_cacheblend.context_text import builtin_context

    items = _items()
    item = items[2]
    contexts = Corpus(items).contexts(parse_family("fixed:2"), item, item.passages)
    assert len(contexts) == 3 and contexts[0] == contexts[2]
    assert "".join(p + "\n\n" for p in contexts[0]) == builtin_context(2)
    assert parse_family("fixed:6").name == "fixed-6"
    with pytest.raises(ValueError):
        Corpus(items).contexts(parse_family("fixed:99"), item, item.passages)


def test_each_family_is_precomputed_right_before_its_own_modes(monkeypatch, tmp_path):
    """The pool's LRU evicted upper-bound chunks precomputed before every other mode ran; a
    family's chunks must be computed just before that family's first mode."""
    import json

    from sglang_cacheblend.eval.quality import run as quality
    from sglang_cacheblend.eval.teacher_forcing import Reference, Scored

    calls: list[str] = []

    class FakeScorer:
        def __init__(self, base_url):
            pass

        def reference(self, prompt, **_):
            return Reference((7,), (7,), 0.0)

        def precompute(self, prompt, family, contexts):
            calls.append(f"precompute {family}")
            return 1.0

        def score(self, prompt, reference, mode):
            calls.append(mode.name)
            return Scored(mode, (7,), (-0.1,), ({7: -0.1},))

    data = tmp_path / "items.json"
    data.write_text(json.dumps([
        {"question": f"q{i}", "answers": ["a"],
         "ctxs": [{"text": f"passage {i} {j} about rivers"} for j in range(3)]}
        for i in range(3)]))
    monkeypatch.setattr(quality, "TeacherForcer", FakeScorer)
    config = QualityConfig(data=data, items=1, passages=2, ratios=(0.15,), selectors=(),
                           gradual_end_layer=None, families=("random:1", "own"))
    quality.evaluate("http://unused", config, lambda ids: "a", lambda text: [1, 2])
    assert calls == ["full", "reuse", "blend@0.15",
                     "precompute random-1", "random-1 reuse", "random-1 blend@0.15",
                     "precompute own", "own (upper bound) reuse", "own (upper bound) blend@0.15"]
