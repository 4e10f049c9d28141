"""Chunk markers, spans and kv_hints actions (``sglang_cacheblend.chunks``): pure, no server."""

from __future__ import annotations

import subprocess
import sys

import pytest

import sglang_cacheblend as cb
from sglang_cacheblend.chunks import (
    ACTION_CHUNKS,
    CHUNK_CLOSE,
    CHUNK_OPEN,
    ChunkedPrompt,
    ClientAction,
    Segment,
    chunk_hints,
    contains_markers,
    precompute_hints,
    precompute_prompt,
    read_client_action,
    sink_ids,
    sink_variant,
    special_affixes,
    split_chunks,
    strip_markers,
    tokenize_segments,
    validate_spans,
)


def encode_words(text: str) -> list[int]:
    """A toy tokenizer: one id per whitespace-separated word (its length), no specials."""
    return [len(word) for word in text.split()]


def with_bos(text: str) -> list[int]:
    return [100, *encode_words(text)]


# ------------------------------------------------------------------------------ markers


def test_chunk_wraps_text_in_markers():
    assert cb.chunk("Paris is in France.") == f"{CHUNK_OPEN}Paris is in France.{CHUNK_CLOSE}"


@pytest.mark.parametrize(
    ("text", "message"),
    [("", "empty"), ("   \n", "empty"), (f"a {CHUNK_OPEN} b", "markers"), (3, "str")],
)
def test_chunk_refuses_bad_text(text, message):
    with pytest.raises(ValueError, match=message):
        cb.chunk(text)


def test_split_keeps_order_and_drops_empty_plain_segments():
    text = "Q: " + cb.chunk("A a") + cb.chunk("B") + " tail"
    assert split_chunks(text) == (
        Segment("Q: ", False),
        Segment("A a", True),
        Segment("B", True),
        Segment(" tail", False),
    )
    assert strip_markers(split_chunks(text)) == "Q: A aB tail"
    assert split_chunks("no chunks") == (Segment("no chunks", False),)
    assert split_chunks(cb.chunk("only")) == (Segment("only", True),)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (f"a {CHUNK_OPEN} b", r"start marker at character 2 is never closed"),
        (f"a {CHUNK_CLOSE} b", r"end marker at character 2 has no matching start"),
        (f"{CHUNK_OPEN}x{CHUNK_OPEN}y{CHUNK_CLOSE}{CHUNK_CLOSE}", "nested"),
        (f"{cb.chunk('x')}{CHUNK_CLOSE}", "no matching start"),
        (f"ok {CHUNK_OPEN}{CHUNK_CLOSE}", r"chunk 0 \(at character 3\) is empty"),
        (f"{cb.chunk('x')}{CHUNK_OPEN} \n{CHUNK_CLOSE}", r"chunk 1 .* is empty"),
    ],
)
def test_split_names_malformed_markers(text, message):
    with pytest.raises(ValueError, match=message):
        split_chunks(text)


def test_contains_markers_walks_nested_messages():
    messages = [{"role": "user", "content": [{"type": "text", "text": cb.chunk("x")}]}]
    assert contains_markers(messages)
    assert not contains_markers([{"role": "user", "content": "plain", "n": 3}])
    assert contains_markers(f"stray {CHUNK_CLOSE}")


# ------------------------------------------------------------------------------ token ids


def test_each_chunk_is_tokenized_on_its_own():
    segments = split_chunks("Docs: " + cb.chunk("alpha beta") + " and " + cb.chunk("gamma") + "?")
    prompt = tokenize_segments(segments, encode_words, prefix_ids=(100,), suffix_ids=(101,))
    #        BOS  Docs:  alpha beta  and  gamma  ?    EOS
    assert prompt.input_ids == (100, 5, 5, 4, 3, 5, 1, 101)
    assert prompt.spans == ((2, 4), (5, 6))


def test_chunk_ids_do_not_depend_on_neighbours():
    encode_chars = lambda text: [ord(c) for c in text]  # noqa: E731
    chunk_text = "shared passage"
    for prefix, suffix in [("x", "y"), ("a long prefix ", "?"), ("", "")]:
        segments = split_chunks(prefix + cb.chunk(chunk_text) + suffix)
        prompt = tokenize_segments(segments, encode_chars)
        ((start, end),) = prompt.spans
        assert list(prompt.input_ids[start:end]) == encode_chars(chunk_text)


def test_oversized_and_empty_chunks_are_refused():
    segments = split_chunks(cb.chunk("one two three"))
    with pytest.raises(ValueError, match="chunk 0 has 3 tokens, more than the limit of 2"):
        tokenize_segments(segments, encode_words, max_chunk_len=2)
    with pytest.raises(ValueError, match="chunk 0 is empty after tokenization"):
        tokenize_segments(segments, lambda text: [])


def test_precompute_prompt_puts_the_chunk_after_the_sink():
    prompt = precompute_prompt([7, 8, 9], (1,))
    assert prompt == ChunkedPrompt((1, 7, 8, 9), ((1, 4),))
    with pytest.raises(ValueError, match="empty"):
        precompute_prompt([], (1,))
    with pytest.raises(ValueError, match="more than the limit"):
        precompute_prompt([7, 8, 9], (1,), max_chunk_len=2)


def test_special_affixes_and_sink():
    assert special_affixes(with_bos, encode_words) == ((100,), ())
    assert special_affixes(lambda t: [100, *encode_words(t), 101], encode_words) == ((100,), (101,))
    assert special_affixes(encode_words, encode_words) == ((), ())
    with pytest.raises(ValueError, match="special tokens"):
        special_affixes(lambda t: [9, 9], encode_words)
    assert sink_ids(1, encode_words) == (1,)
    assert sink_ids(None, lambda t: [13]) == (13,)
    assert sink_variant((1,)) != sink_variant((13,))


# ------------------------------------------------------------------------------ spans


@pytest.mark.parametrize(
    ("spans", "message"),
    [
        ([[0, 4], [3, 6]], r"sorted and must not overlap: span 1 \[3, 6\) starts before span 0"),
        ([[4, 6], [0, 2]], "sorted and must not overlap"),
        ([[2, 2]], r"span 0 \[2, 2\) is empty"),
        ([[5, 3]], "is empty"),
        ([[0, 11]], r"outside the prompt of 10 tokens"),
        ([[-1, 3]], "outside the prompt"),
        ([[0, 1, 2]], "pair of ints"),
        ([["0", 2]], "pair of ints"),
        ([[True, 2]], "pair of ints"),
        ("0-2", "list of"),
    ],
)
def test_bad_spans_are_named(spans, message):
    with pytest.raises(ValueError, match=message):
        validate_spans(spans, 10)


def test_good_spans_pass_and_may_touch():
    assert validate_spans([[0, 2], (2, 5), [7, 10]], 10) == ((0, 2), (2, 5), (7, 10))
    assert validate_spans([], 0) == ()
    with pytest.raises(ValueError, match="more than the limit of 2"):
        validate_spans([[0, 3]], 10, max_chunk_len=2)


# ------------------------------------------------------------------------------ actions


def _triples(envelope: dict) -> list[tuple]:
    return [(a["action_type"], a["action_version"], a["payload"]) for a in envelope["actions"]]


def test_client_envelopes_read_back():
    hints = chunk_hints([(3, 9), (9, 12)])
    assert hints["actions"][0]["action_type"] == ACTION_CHUNKS
    assert hints["protocol_version"] and hints["message_id"] and hints["actions"][0]["action_id"]
    action = read_client_action(_triples(hints))
    assert action == ClientAction(False, ((3, 9), (9, 12)))
    pre = read_client_action(_triples(precompute_hints()))
    assert pre.precompute and pre.spans == ()
    assert read_client_action([("other.kind", "7", None)]) is None
    tuned = read_client_action(_triples(chunk_hints([(0, 4)], recompute_ratio=0.3,
                                                     selector="v_deviation", gradual=[(1, 0.3)])))
    assert dict(tuned.settings) == {"recompute_ratio": 0.3, "selector": "v_deviation",
                                    "gradual": ((1, 0.3),)}
    assert dict(action.settings) == {}
    auto = read_client_action(_triples(chunk_hints([(0, 4)], ratio_policy="controller")))
    assert dict(auto.settings) == {"ratio_policy": "controller"}


def test_every_setting_a_request_may_give_is_a_payload_key_and_nothing_else():
    """The payload keys come from the settings table: a row marked per-request is accepted,
    any other setting is an unknown key (and a chunk_hints TypeError)."""
    from sglang_cacheblend.options import REQUEST_SETTINGS, SETTINGS

    for row in REQUEST_SETTINGS:
        value = {"gradual": [[1, 0.15]], "ratio_policy": "fixed"}.get(row.name, 1)
        action = read_client_action(_triples(chunk_hints([(0, 4)], **{row.name: value})))
        assert row.name in action.settings
    for row in SETTINGS:
        if row.per_request or row.name == "chunk_context":  # a request's picks server/none
            continue
        with pytest.raises(ValueError, match="unknown keys"):
            read_client_action([(ACTION_CHUNKS, "1", {"spans": [[0, 2]], row.name: 1})])
        with pytest.raises(TypeError, match="unknown settings"):
            chunk_hints([(0, 4)], **{row.name: 1})


def test_settings_are_checked_once_by_blendconfig_on_the_merge():
    """A request's ratio, selector or window is not checked twice: it is read as sent and
    ``BlendConfig`` refuses it, naming the field, when it is merged with the server's."""
    from sglang_cacheblend.config import BlendConfig
    from sglang_cacheblend.serving.blend_settings import effective_config

    for payload, field in [({"recompute_ratio": float("nan")}, "recompute_ratio"),
                           ({"recompute_ratio": 1.5}, "recompute_ratio"),
                           ({"selector": ["v_deviation"]}, "selector"),
                           ({"recompute_window": 0}, "recompute_window"),
                           ({"recompute_window": True}, "recompute_window"),
                           ({"gradual": [[1, 0.3], [1, 0.15]]}, "gradual")]:
        action = read_client_action([(ACTION_CHUNKS, "1", {"spans": [[0, 2]], **payload})])
        with pytest.raises(ValueError, match=f"BlendConfig.{field}"):
            effective_config(BlendConfig(), action)
    wide = read_client_action(_triples(chunk_hints([(0, 4)], recompute_window=8192)))
    assert effective_config(BlendConfig(), wide).recompute_window == 8192  # no second bound


@pytest.mark.parametrize(
    ("actions", "message"),
    [
        ([(ACTION_CHUNKS, "2", {"spans": []})], "action_version must be '1'"),
        ([(ACTION_CHUNKS, "1", {})], "needs 'spans'"),
        ([(ACTION_CHUNKS, "1", [1, 2])], "payload must be an object"),
        ([(ACTION_CHUNKS, "1", {"spans": [[0, 2]]})] * 2, "2 CacheBlend actions"),
        ([(ACTION_CHUNKS, "1", {"spans": [[2, 4], [0, 1]]})], "sorted"),
        ([(ACTION_CHUNKS, "1", {"spans": [[0, 2]], "variant": "x"})], "unknown keys"),
        ([(ACTION_CHUNKS, "1", {"spans": [[0, float("inf")]]})], "pair of ints"),
        ([(ACTION_CHUNKS, "1", {"spans": [[0, 2]], "gradual": "1,0.3"})], "gradual must be"),
        ([(ACTION_CHUNKS, "1", {"spans": [[0, 2]], "gradual": [[1, 0.3], "x"]})],
         "gradual steps must be"),
        ([(ACTION_CHUNKS, "1", {"spans": [[0, 2]], "ratio_policy": "auto"})], "ratio_policy"),
        ([(ACTION_CHUNKS, "1", {"spans": [[0, 2]], "ratio_policy": "controller",
                                "recompute_ratio": 0.2})], "controller' picks the ratio"),
    ],
)
def test_bad_client_actions_are_named(actions, message):
    with pytest.raises(ValueError, match=message):
        read_client_action(actions)


def test_package_import_stays_light():
    code = (
        "import sys, sglang_cacheblend as cb; cb.chunk('x'); "
        "print(any(m in sys.modules for m in ('torch', 'sglang', 'requests')))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_sink_variant_names_the_sink():
    assert sink_variant((1,)) != sink_variant((198, 7))
    assert sink_variant((198, 7)) == sink_variant([198, 7])
    with pytest.raises(ValueError, match="at least one token"):
        sink_variant(())


def test_span_limits_bound_chunk_count_and_length():
    """Review F8: thousands of one-token chunks each cost a standalone forward."""
    assert validate_spans([(0, 4), (4, 8)], 8, min_chunk_len=4, max_chunks=2) == ((0, 4), (4, 8))
    with pytest.raises(ValueError, match="3 chunks in one request, more than .* limit of 2"):
        validate_spans([(0, 4), (4, 8), (8, 12)], 12, max_chunks=2)
    with pytest.raises(ValueError, match=r"chunk span 1 \[4, 5\) has 1 tokens, fewer than .* 4"):
        validate_spans([(0, 4), (4, 5)], 8, min_chunk_len=4)


# ---------------------------------------------------------------- chunk contexts (issue 17)

def test_the_context_variant_names_the_context_and_keeps_standalone_keys():
    from sglang_cacheblend.chunks import context_variant, prefix_variant, sink_variant

    assert context_variant((1,), ()) == sink_variant((1,)) == "standalone-after:1"
    a, b = context_variant((1,), (5, 6, 7)), context_variant((1,), (5, 6, 8))
    assert a.startswith("standalone-after:1+context:3:") and a != b
    assert context_variant((1,), (5, 6, 7)) == a  # stable
    assert prefix_variant(a) != a


def test_resolve_context_reads_builtin_paragraphs_files_and_refuses_the_rest(tmp_path):
    from sglang_cacheblend.context_text import builtin_context, resolve_context

    assert resolve_context(None) == resolve_context("none") == resolve_context(" ") == ""
    one, three = resolve_context("builtin:1"), resolve_context("builtin")
    assert three == builtin_context(3) and three.startswith(one) and len(three) > 2 * len(one)
    assert one.endswith("\n\n") and one.count("\n\n") == 1
    path = tmp_path / "context.txt"
    path.write_text("Some preceding text.\n\n")
    assert resolve_context(str(path)) == "Some preceding text.\n\n"
    for bad in ("builtin:0", "builtin:99", "builtin:x", str(tmp_path / "missing.txt")):
        with pytest.raises(ValueError):
            resolve_context(bad)
    (tmp_path / "empty.txt").write_text("  \n")
    with pytest.raises(ValueError, match="empty"):
        resolve_context(str(tmp_path / "empty.txt"))


def test_chunk_context_in_hints_is_parsed_and_checked():
    assert read_client_action(_triples(chunk_hints([(0, 4)]))).chunk_context is None
    action = read_client_action(_triples(chunk_hints([(0, 4)], chunk_context="none")))
    assert action.chunk_context == "none"
    pre = read_client_action(_triples(precompute_hints(chunk_context="none")))
    assert pre.precompute and pre.chunk_context == "none"
    with pytest.raises(ValueError, match="chunk_context must be one of"):
        read_client_action(_triples(chunk_hints([(0, 4)], chunk_context="bm25")))
    bad_pre = precompute_hints()
    bad_pre["actions"][0]["payload"] = {"spans": [[0, 4]]}
    with pytest.raises(ValueError, match="unknown keys"):
        read_client_action(_triples(bad_pre))


def test_a_context_family_is_named_by_its_name_only_and_checked_in_hints():
    from sglang_cacheblend.chunks import context_variant, family_variant

    assert family_variant((1,), "bm25-3") == "standalone-after:1+family:bm25-3"
    assert family_variant((1,), "bm25-3") not in (family_variant((1,), "random-3"),
                                                  context_variant((1,), (5,)))
    pre = read_client_action(_triples(precompute_hints(context_family="bm25-3",
                                                       context_ids=[5, 6])))
    assert pre.precompute and pre.context_family == "bm25-3" and pre.context_ids == (5, 6)
    blend = read_client_action(_triples(chunk_hints([(0, 4)], context_family="bm25-3")))
    assert blend.context_family == "bm25-3" and blend.context_ids is None
    bad = [
        (precompute_hints(context_family="bm25 3", context_ids=[5]), "context_family must"),
        (precompute_hints(context_family="f"), "needs its context_ids"),
        (precompute_hints(context_ids=[5]), "need a context_family"),
        (precompute_hints(context_family="f", context_ids=[]), "non-empty"),
        (precompute_hints(context_family="f", context_ids=[5], chunk_context="none"), "not both"),
        (chunk_hints([(0, 4)], context_family="f", chunk_context="server"), "not both"),
    ]
    raw = chunk_hints([(0, 4)], context_family="f")
    raw["actions"][0]["payload"]["context_ids"] = [5]
    bad.append((raw, "unknown keys"))
    raw = precompute_hints(context_family="f", context_ids=[5])
    raw["actions"][0]["payload"]["context_ids"] = [5, True, -1]
    bad.append((raw, "non-negative integer"))
    for hints, message in bad:
        with pytest.raises(ValueError, match=message):
            read_client_action(_triples(hints))
