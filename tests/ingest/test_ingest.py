"""Corpus ingest without a server: reading, splitting, the state file, batches and the command.

Splitting is checked with two toy codecs (one token per character; one token per UTF-8 byte,
whose cuts can split a character) and with the embedded model's own tokenizer, which is what
the server tokenizes chunks with: every token window must encode back to its own ids.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from sglang_cacheblend.ingest import (
    Codec,
    Document,
    IngestState,
    SplitConfig,
    ingest_key,
    plan_ingest,
    precompute_batches,
    read_documents,
)
from sglang_cacheblend.ingest.corpus import split_document, split_paragraphs, split_token_windows
from sglang_cacheblend.ingest.state import HEADER, StateRecord, default_state_path

CHARS = Codec(encode=lambda text: [ord(c) for c in text],
              decode=lambda ids: "".join(chr(i) for i in ids))
BYTES = Codec(encode=lambda text: list(text.encode("utf-8")),
              decode=lambda ids: bytes(ids).decode("utf-8", errors="replace"))


@pytest.fixture(scope="module")
def model_codec(model_path):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_path)
    return Codec(encode=lambda t: tokenizer.encode(t, add_special_tokens=False),
                 decode=lambda ids: tokenizer.decode(ids, skip_special_tokens=False,
                                                     clean_up_tokenization_spaces=False))


def test_reading_and_splitting_import_neither_torch_nor_sglang():
    code = ("import sys, sglang_cacheblend.ingest.runner\n"
            "from sglang_cacheblend.ingest import read_documents\n"
            "from sglang_cacheblend.dataset import DEFAULT_DATA_PATH\n"
            "read_documents(DEFAULT_DATA_PATH)\n"
            "print(sorted(m for m in ('torch', 'sglang', 'transformers') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True, cwd=Path(__file__).resolve().parents[2])
    assert out.stdout.strip() == "[]"


# ------------------------------------------------------------------------- paragraphs


def test_paragraphs_merge_up_to_max_tokens_in_order():
    paragraphs = ["a" * 20, "b" * 20, "c" * 20, "d" * 50, "e" * 30]
    text = "\n\n".join(paragraphs) + "\n"
    chunks = split_paragraphs(text, CHARS, max_tokens=64, min_tokens=16)
    # a+b+c fit (20+2+20+2+20 = 64); d alone; e would make d 82 > 64.
    assert chunks == ["a" * 20 + "\n\n" + "b" * 20 + "\n\n" + "c" * 20, "d" * 50, "e" * 30]
    assert all(16 <= len(c) <= 64 for c in chunks)


def test_blank_lines_with_spaces_separate_paragraphs_and_whitespace_is_stripped():
    text = "  " + "x" * 20 + "  \n \t \n\n" + "y" * 20 + "\n"
    assert split_paragraphs(text, CHARS, max_tokens=20, min_tokens=16) == ["x" * 20, "y" * 20]


def test_short_paragraphs_join_the_next_and_a_short_last_one_the_chunk_before():
    heading, body, tail = "Intro", "b" * 60, "end."
    chunks = split_paragraphs(f"{heading}\n\n{body}\n\n{tail}", CHARS, max_tokens=60,
                              min_tokens=16)
    # The heading (5 tokens) joins the body although that passes 60; so does the tail.
    assert chunks == [f"{heading}\n\n{body}\n\n{tail}"]
    chunks = split_paragraphs(f"{'a' * 30}\n\n{'b' * 30}\n\n{tail}", CHARS, max_tokens=40,
                              min_tokens=16)
    assert chunks == ["a" * 30, "b" * 30 + "\n\n" + tail]
    assert min(len(c) for c in chunks) >= 16
    assert max(len(c) for c in chunks) < 40 + 16 + 2  # the documented bound


def test_a_document_below_the_minimum_gives_no_chunk_and_is_counted_as_dropped():
    docs = [Document("tiny", "Too short."), Document("ok", "o" * 40)]
    split = SplitConfig("paragraph", max_tokens=64, min_tokens=16)
    assert split_document(docs[0], CHARS, split) == []
    plan = plan_ingest(docs, CHARS, split, model="m")
    assert plan.dropped == ("tiny",) and [c.doc_id for c in plan.chunks] == ["ok"]
    none = SplitConfig("none", min_tokens=16)
    assert split_document(docs[0], CHARS, none) == []
    assert [c.text for c in split_document(docs[1], CHARS, none)] == ["o" * 40]


def test_a_long_paragraph_is_cut_into_windows_joined_without_a_paragraph_break():
    long = "".join(chr(ord("a") + i % 26) for i in range(150))
    chunks = split_paragraphs(f"{long}\n\n{'z' * 20}", CHARS, max_tokens=64, min_tokens=16)
    assert chunks[0] == long[:64] and chunks[1] == long[64:128]
    # The 22-token end of the paragraph and the next paragraph share a chunk (22+2+20 <= 64).
    assert chunks[2] == long[128:] + "\n\n" + "z" * 20
    assert "".join(chunks[:2]) + chunks[2].split("\n\n")[0] == long


# ------------------------------------------------------------------------- token windows


def test_token_windows_cover_the_ids_and_never_leave_a_short_tail():
    text = "w" * 100
    windows = split_token_windows(text, CHARS, window=30, min_tokens=16)
    # 30, 30, then 40: a 10-token tail would be below the minimum, so it joins the last window.
    assert [len(w) for w in windows] == [30, 30, 40] and "".join(windows) == text
    assert [len(w) for w in split_token_windows("w" * 76, CHARS, window=30, min_tokens=16)] == [
        30, 30, 16]


def test_token_window_cuts_move_off_a_split_character():
    text = "é" * 50  # two bytes each: a 33-byte window would end inside a character
    windows = split_token_windows(text, BYTES, window=33, min_tokens=16)
    assert "".join(windows) == text and "\ufffd" not in "".join(windows)
    assert all(BYTES.encode(BYTES.decode(BYTES.encode(w))) == BYTES.encode(w) for w in windows)
    # 33 -> 32 at each cut; the last 3 bytes would be below the minimum, so they join the last.
    assert [len(w.encode()) for w in windows] == [32, 32, 36]


def test_token_windows_round_trip_through_the_model_tokenizer(model_codec):
    from sglang_cacheblend.dataset import DEFAULT_DATA_PATH, load_items

    passage = load_items(DEFAULT_DATA_PATH)[0].passages[0]
    mixed = ("Zürich’s Große Straße — naïve café, 東京と大阪の間、unbelievably "
             "reorganisation-friendly emoji 🙂🙂 text.\n\n") * 12
    naive_failures = 0
    for text in (passage, mixed):
        ids = list(model_codec.encode(text))
        for window in (17, 32, 50):
            windows = split_token_windows(text, model_codec, window=window, min_tokens=16)
            window_ids = [list(model_codec.encode(w)) for w in windows]
            # Each window's text is what the server will tokenize: its ids are a slice of the
            # document's, and the slices tile the document with no gap or overlap.
            assert [t for w in window_ids for t in w] == ids
            assert "".join(windows) == model_codec.decode(ids)
            assert all(16 <= len(w) < window + 16 for w in window_ids)
            naive_failures += sum(
                list(model_codec.encode(model_codec.decode(ids[s:s + window]))) != ids[s:s + window]
                for s in range(0, len(ids), window))
    assert naive_failures > 0  # cutting blindly every `window` ids would not round-trip


def test_split_config_refuses_what_the_server_would_refuse():
    with pytest.raises(ValueError, match="split must be one of"):
        SplitConfig("sentences")
    with pytest.raises(ValueError, match="below the minimum"):
        SplitConfig("tokens", window=8, min_tokens=16)
    with pytest.raises(ValueError, match="exceed the server's limit"):
        SplitConfig("paragraph", max_tokens=8180, min_tokens=16, max_chunk_tokens=8191)
    with pytest.raises(ValueError, match="int >= 1"):
        SplitConfig("paragraph", max_tokens=0)
    too_long = Document("big", "x" * 200)
    with pytest.raises(ValueError, match="'big'.*200 tokens.*limit of 100"):
        split_document(too_long, CHARS, SplitConfig("none", max_chunk_tokens=100))


# ------------------------------------------------------------------------- input formats


def test_jsonl_documents_with_and_without_ids_and_another_text_field(tmp_path):
    path = tmp_path / "corpus.jsonl"
    path.write_text(json.dumps({"id": "a", "body": "First."}) + "\n\n"
                    + json.dumps({"body": "Second."}) + "\n")
    docs = read_documents(path, text_field="body")
    assert docs == [Document("a", "First."), Document("corpus.jsonl:3", "Second.")]
    with pytest.raises(ValueError, match=r"corpus.jsonl:1: needs a str field 'text'"):
        read_documents(path)
    path.write_text('{"text": "ok"}\n{"text": "cut\n')
    with pytest.raises(ValueError, match=r"corpus.jsonl:2: not valid JSON"):
        read_documents(path)


def test_a_folder_reads_its_txt_and_md_files_sorted(tmp_path):
    (tmp_path / "b.md").write_text("B")
    (tmp_path / "a.txt").write_text("A")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "c.txt").write_text("C")
    (tmp_path / "skip.json").write_text("[]")
    docs = read_documents(tmp_path)
    assert [(d.doc_id, d.text) for d in docs] == [("a.txt", "A"), ("b.md", "B"),
                                                  ("sub/c.txt", "C")]
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no .txt/.md files"):
        read_documents(tmp_path / "empty")


def test_musique_json_gives_one_document_per_passage():
    from sglang_cacheblend.dataset import DEFAULT_DATA_PATH, load_items

    items = load_items(DEFAULT_DATA_PATH)
    docs = read_documents(DEFAULT_DATA_PATH)
    assert len(docs) == sum(len(i.passages) for i in items)
    assert docs[1] == Document("0.1", items[0].passages[1])


def test_texts_holding_chunk_markers_are_refused(tmp_path):
    path = tmp_path / "c.jsonl"
    path.write_text(json.dumps({"id": "x", "text": "a <|cacheblend_chunk|> b"}) + "\n")
    with pytest.raises(ValueError, match="'x' holds a chunk marker"):
        read_documents(path)


# ------------------------------------------------------------------------- state file


def _records(n: int, start: int = 0) -> list[StateRecord]:
    return [StateRecord(ingest_key(f"t{i}", model="m"), "d", i, 20)
            for i in range(start, start + n)]


def test_ingest_key_depends_on_text_model_salt_and_extra_key():
    base = ingest_key("text", model="m", cache_salt="s", extra_key="k")
    assert base == ingest_key("text", model="m", cache_salt="s", extra_key="k")
    others = {ingest_key("text!", model="m", cache_salt="s", extra_key="k"),
              ingest_key("text", model="m2", cache_salt="s", extra_key="k"),
              ingest_key("text", model="m", cache_salt=None, extra_key="k"),
              ingest_key("text", model="m", cache_salt="s", extra_key=None)}
    assert base not in others and len(others) == 4


def test_ingest_key_names_the_chunk_context_the_kv_is_computed_after():
    """The same text after another server context is other KV: a state written against one
    context must not mark chunks done for a server with another."""
    plain = ingest_key("text", model="m")
    assert ingest_key("text", model="m", chunk_context="") == plain  # old state files stay valid
    builtin = ingest_key("text", model="m", chunk_context="Some context.\n\n")
    assert builtin not in (plain, ingest_key("text", model="m", chunk_context="Other.\n\n"))
    assert builtin == ingest_key("text", model="m", chunk_context="Some context.\n\n")
    # A family replaces the server's context, so only the family names the KV then.
    assert ingest_key("text", model="m", chunk_context="Some context.\n\n", family="f") == (
        ingest_key("text", model="m", family="f"))


def test_state_resumes_with_the_batches_recorded(tmp_path):
    path = tmp_path / "state.jsonl"
    with IngestState(path) as state:
        state.record(_records(3))
        state.record(_records(2, start=3))
        state.check_integrity()
    with IngestState(path) as state:
        assert len(state) == 5 and all(r.key in state for r in _records(5))
        assert _records(1, start=5)[0].key not in state
        assert not state.dropped_partial_line
    with IngestState(path, fresh=True) as state:
        assert len(state) == 0
    assert path.read_text() == HEADER + "\n"


def test_a_cut_off_last_line_is_dropped_and_appending_continues_cleanly(tmp_path):
    path = tmp_path / "state.jsonl"
    with IngestState(path) as state:
        state.record(_records(2))
    whole = path.read_text()
    path.write_text(whole + json.dumps({"key": "abc", "doc_id": "d"})[:15])  # cut mid-write
    with IngestState(path) as state:
        assert state.dropped_partial_line and len(state) == 2
        state.record(_records(1, start=2))
        state.check_integrity()
    lines = path.read_text().splitlines()
    assert lines[0] == HEADER and len(lines) == 4 and all(json.loads(line) for line in lines)
    # Cut right before its newline, a record is whole: kept, and the next one starts a line.
    path.write_text(path.read_text().rstrip("\n"))
    with IngestState(path) as state:
        assert not state.dropped_partial_line and len(state) == 3
        state.record(_records(1, start=3))
        state.check_integrity()
    # Only the header, cut off: an empty state.
    path.write_text(HEADER[:10])
    with IngestState(path) as state:
        assert state.dropped_partial_line and len(state) == 0
    assert path.read_text() == HEADER + "\n"


def test_a_damaged_middle_line_or_a_foreign_file_is_refused_untouched(tmp_path):
    path = tmp_path / "state.jsonl"
    with IngestState(path) as state:
        state.record(_records(2))
    lines = path.read_text().splitlines()
    path.write_text("\n".join([lines[0], "garbage", lines[2]]) + "\n")
    with pytest.raises(ValueError, match=r"state.jsonl:2: damaged state record"):
        IngestState(path)
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text('{"text": "a document"}\n{"text": "cut')
    before = corpus.read_bytes()
    with pytest.raises(ValueError, match="not an ingest state file"):
        IngestState(corpus)
    assert corpus.read_bytes() == before


def test_default_state_path_sits_beside_the_input(tmp_path):
    assert default_state_path(tmp_path / "c.jsonl") == tmp_path / "c.jsonl.ingest-state.jsonl"
    assert default_state_path(tmp_path / "docs") == tmp_path / "docs.ingest-state.jsonl"


# ------------------------------------------------------------------------- batches


def _plan(n: int):
    docs = [Document(f"d{i}", f"document number {i} " + "x" * 20) for i in range(n)]
    return plan_ingest(docs, CHARS, SplitConfig("none"), model="m", cache_salt="s")


def test_a_failed_batch_loses_only_itself_and_a_rerun_sends_the_rest(tmp_path):
    plan = _plan(10)
    sent: list[list[str]] = []

    def dies_on_third_batch(batch) -> None:
        if len(sent) == 2:
            raise ConnectionError("server gone")
        sent.append([c.text for c in batch])

    path = tmp_path / "state.jsonl"
    with IngestState(path) as state:
        result = precompute_batches(list(zip(plan.keys, plan.chunks)), dies_on_third_batch,
                                    state, batch=3, progress=False)
    assert result.precomputed == 6 and result.remaining == 4
    assert result.error == "ConnectionError: server gone" and not result.interrupted
    with IngestState(path) as state:
        pending = [(k, c) for k, c in zip(plan.keys, plan.chunks) if k not in state]
        assert [c.doc_id for _, c in pending] == ["d6", "d7", "d8", "d9"]
        again = precompute_batches(pending, lambda batch: sent.append([c.text for c in batch]),
                                   state, batch=3, progress=False)
        assert again.precomputed == 4 and again.error is None and len(state) == 10
    assert sent[2:] == [[c.text for c in plan.chunks[6:9]], [plan.chunks[9].text]]


def test_ctrl_c_keeps_the_finished_batches(tmp_path):
    plan = _plan(5)
    calls = []

    def interrupted_on_second(batch) -> None:
        calls.append(batch)
        if len(calls) == 2:
            raise KeyboardInterrupt

    with IngestState(tmp_path / "s.jsonl") as state:
        result = precompute_batches(list(zip(plan.keys, plan.chunks)), interrupted_on_second,
                                    state, batch=2, progress=False)
        assert result.interrupted and result.precomputed == 2 and len(state) == 2


def test_repeated_chunks_are_planned_once():
    docs = [Document("a", "same text of twenty+ characters"),
            Document("b", "same text of twenty+ characters"), Document("c", "y" * 30)]
    plan = plan_ingest(docs, CHARS, SplitConfig("none"), model="m")
    assert plan.duplicates == 1 and [c.doc_id for c in plan.chunks] == ["a", "c"]
    assert plan.tokens == len(docs[0].text) + 30


# ------------------------------------------------------------------------- the command


def test_unknown_arguments_go_to_the_server():
    from sglang_cacheblend.cli import build_parser
    from sglang_cacheblend.ingest.runner import keeps_chunks
    from sglang_cacheblend.options import parse_server_flags

    args, rest = build_parser().parse_known_args(
        ["ingest", "c.jsonl", "--batch", "4", "--max-total-tokens", "9000",
         "--cacheblend-disk-tier-dir=/tmp/tier"])
    assert args.command == "ingest" and args.batch == 4 and args.input == Path("c.jsonl")
    assert rest == ["--max-total-tokens", "9000", "--cacheblend-disk-tier-dir=/tmp/tier"]
    assert keeps_chunks(parse_server_flags(rest))
    assert keeps_chunks(parse_server_flags([
        "--cacheblend-mooncake-master", "127.0.0.1:50051",
        "--cacheblend-mooncake-metadata", "http://127.0.0.1:8080/metadata"]))
    assert not keeps_chunks(parse_server_flags(["--max-total-tokens", "9000",
                                                "--cacheblend-disk-tier-mb", "64"]))


def _fake_server_class(started: list[dict]) -> type:
    """Stands in for ``ServerProcess``: appends its arguments to ``started``, serves nothing."""

    class FakeServer:
        def __init__(self, **kwargs) -> None:
            self.kwargs = kwargs
            self.base_url = "http://127.0.0.1:1"

        def start(self):
            started.append(self.kwargs)
            return self

        def is_running(self) -> bool:
            return True

        def stop(self) -> None:
            pass

    return FakeServer


def _ingest_args(tmp_path: Path, corpus: Path, **overrides) -> argparse.Namespace:
    from sglang_cacheblend.cli import build_parser

    args, _ = build_parser().parse_known_args(
        ["ingest", str(corpus), "--no-progress", "--batch", "2"])
    for name, value in overrides.items():
        setattr(args, name, value)
    return args


def test_own_server_gets_the_flags_a_warning_and_skips_only_with_a_tier(
        tmp_path, monkeypatch, capsys):
    import sglang_cacheblend.chunks as chunks_pkg
    from sglang_cacheblend import launch
    from sglang_cacheblend.ingest import runner

    corpus = tmp_path / "c.jsonl"
    corpus.write_text("".join(json.dumps({"id": f"d{i}", "text": f"Paragraph {i} of the "
                                          "corpus, long enough to be one chunk of its own."})
                              + "\n" for i in range(3)))
    sent: list[str] = []
    monkeypatch.setattr(chunks_pkg, "precompute_chunks",
                        lambda url, texts, **kw: sent.extend(texts) or [{}] * len(texts))
    # (no meta_info: the tokenization check has nothing to compare; the server test has)
    started: list[dict] = []
    monkeypatch.setattr(launch, "ServerProcess", _fake_server_class(started))
    monkeypatch.setattr(runner, "wait_for_store_writes", lambda url, timeout_s: 0)  # no server

    first = runner.run(_ingest_args(tmp_path, corpus), ["--max-total-tokens", "9000"])
    out = capsys.readouterr().out
    assert "warning: no --cacheblend-disk-tier-dir or --cacheblend-mooncake-master" in out
    assert started[0]["args"] == ["--enable-cacheblend", "--max-total-tokens", "9000"]
    assert first.precomputed == 3 and first.skipped == 0 and len(sent) == 3
    assert re.search(r"skipped\s+0", out) and "chunks/s" in out
    # A new server without a tier holds nothing: the state is not trusted, all go again.
    again = runner.run(_ingest_args(tmp_path, corpus), [])
    assert again.skipped == 0 and again.precomputed == 3 and len(sent) == 6
    assert "precomputed again" in capsys.readouterr().out
    # With a persistent tier the chunks done are skipped, and no server is started for none.
    tier = ["--cacheblend-disk-tier-dir", str(tmp_path / "tier")]
    starts = len(started)
    tiered = runner.run(_ingest_args(tmp_path, corpus), tier)
    out = capsys.readouterr().out
    assert tiered.skipped == 3 and tiered.precomputed == 0 and len(sent) == 6
    assert "warning" not in out and len(started) == starts
    assert runner.summary_exit_code(tiered) == 0


def test_a_server_that_tokenizes_a_chunk_otherwise_stops_the_ingest(
        tmp_path, monkeypatch, model_path, model_codec):
    import sglang_cacheblend.chunks as chunks_pkg
    from sglang_cacheblend.ingest import runner

    corpus = tmp_path / "c.jsonl"
    corpus.write_text("".join(json.dumps({"text": f"Document {i}, long enough to be a chunk "
                                          "of its own for the server."}) + "\n"
                              for i in range(4)))
    served = []

    def answers(url, texts, **kw):  # BOS sink + the chunk; one token more from the third on
        for text in texts:
            served.append(1 + len(model_codec.encode(text)) + (len(served) >= 2))
        return [{"meta_info": {"prompt_tokens": n}} for n in served[-len(texts):]]

    monkeypatch.setattr(chunks_pkg, "precompute_chunks", answers)
    monkeypatch.setattr(runner, "wait_for_store_writes", lambda url, timeout_s: 0)  # no server
    monkeypatch.setattr(runner, "_running_server",
                        lambda url, path: runner._Target(str(model_path), str(model_path), 16,
                                                         "", True))
    summary = runner.run(_ingest_args(tmp_path, corpus, url="http://127.0.0.1:1"), [])
    assert summary.precomputed == 2 and summary.remaining == 2 and len(served) == 4
    assert "tokenized chunk 0 of 'c.jsonl:3'" in summary.error
    assert runner.summary_exit_code(summary) == 1


def _server_answers(model_codec, context: str, served: list[int]):
    """A fake ``precompute_chunks`` that answers as a server does: ``prompt_tokens`` is the BOS
    sink, the server's chunk context and the chunk, each tokenized on its own."""
    context_len = len(model_codec.encode(context)) if context else 0

    def answers(url, texts, **kw):
        lengths = [1 + context_len + len(model_codec.encode(text)) for text in texts]
        served.extend(lengths)
        return [{"meta_info": {"prompt_tokens": n}} for n in lengths]

    return answers


def _folder_corpus(tmp_path: Path, count: int = 3) -> Path:
    folder = tmp_path / "docs"
    folder.mkdir()
    for i in range(count):
        (folder / f"doc{i}.txt").write_text(f"Document {i} of the folder, long enough to be a "
                                            "chunk of its own for the server to precompute.")
    return folder


def test_the_tokenized_alike_check_counts_the_context_before_each_chunk(model_codec):
    """Regression: the server's ``prompt_tokens`` of a precompute holds its chunk context, which
    the check counted as the chunk's own tokens."""
    from sglang_cacheblend.context_text import builtin_context
    from sglang_cacheblend.ingest import runner
    from sglang_cacheblend.ingest.corpus import Chunk

    text = "A chunk of text the server precomputes after its context."
    chunk = Chunk("doc0.txt", 0, text, len(model_codec.encode(text)))
    prefix = 1 + len(model_codec.encode(builtin_context()))
    served = [{"meta_info": {"prompt_tokens": prefix + chunk.num_tokens}}]
    runner._check_tokenized_alike([chunk], served, [prefix])  # alike
    with pytest.raises(RuntimeError, match=r"chunk 0 of 'doc0.txt' into .* ingest into"):
        runner._check_tokenized_alike([chunk], served, [1])  # the context not counted


@pytest.mark.parametrize("running", [False, True], ids=["started-here", "url"])
def test_ingest_against_a_server_with_the_default_chunk_context_completes(
        tmp_path, monkeypatch, model_path, model_codec, running):
    """Regression (issue 24): ``sglang-cacheblend ingest DIR`` against a server with default
    flags stopped at its first batch, "the server tokenized chunk 0 of 'doc0.txt' into 1144
    tokens, ingest into 590": the difference is the shipped context's tokens."""
    import sglang_cacheblend.chunks as chunks_pkg
    from sglang_cacheblend import launch
    from sglang_cacheblend.context_text import builtin_context
    from sglang_cacheblend.ingest import runner

    served: list[int] = []
    monkeypatch.setattr(chunks_pkg, "precompute_chunks",
                        _server_answers(model_codec, builtin_context(), served))
    monkeypatch.setattr(runner, "wait_for_store_writes", lambda url, timeout_s: 0)  # no server
    monkeypatch.setattr(launch, "ServerProcess", _fake_server_class([]))
    monkeypatch.setattr(runner, "_running_server", lambda url, path: runner._Target(
        str(model_path), str(model_path), 16, builtin_context(), True))
    args = _ingest_args(tmp_path, _folder_corpus(tmp_path), model_path=model_path,
                        url="http://127.0.0.1:1" if running else None)
    summary = runner.run(args, [])
    assert summary.error is None and summary.ok and summary.precomputed == len(served) == 3


def test_a_state_written_against_one_chunk_context_skips_nothing_under_another(
        tmp_path, monkeypatch, capsys, model_path):
    """The resume key names the server's chunk context: chunks done after the builtin context
    are not done for a server computing them standalone (``none``), and the reverse."""
    import sglang_cacheblend.chunks as chunks_pkg
    from sglang_cacheblend import launch
    from sglang_cacheblend.ingest import runner

    sent: list[str] = []
    monkeypatch.setattr(chunks_pkg, "precompute_chunks",
                        lambda url, texts, **kw: sent.extend(texts) or [{}] * len(texts))
    monkeypatch.setattr(runner, "wait_for_store_writes", lambda url, timeout_s: 0)
    monkeypatch.setattr(launch, "ServerProcess", _fake_server_class([]))
    corpus = _folder_corpus(tmp_path)
    tier = ["--cacheblend-disk-tier-dir", str(tmp_path / "tier")]

    def ingest(*flags: str):
        return runner.run(_ingest_args(tmp_path, corpus, model_path=model_path), [*tier, *flags])

    assert ingest().precomputed == 3  # the default: the builtin context
    standalone = ingest("--cacheblend-chunk-context", "none")
    assert standalone.skipped == 0 and standalone.precomputed == 3
    assert ingest().skipped == 3 and ingest("--cacheblend-chunk-context", "none").skipped == 3
    assert ingest("--cacheblend-chunk-context", "builtin:1").precomputed == 3
    assert len(sent) == 9


@contextlib.contextmanager
def _server_info(stores):
    """A loopback stand-in for ``GET /server_info``: ``stores()`` gives each rank's store
    counters at every call; yields the base URL."""
    import http.server
    import threading

    class Info(http.server.BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802 - the stdlib's name
            body = json.dumps({"internal_states": [{"cacheblend": {"store": store}}
                                                   for store in stores()]}).encode()
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    server = http.server.HTTPServer(("127.0.0.1", 0), Info)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()


def test_a_batch_is_done_only_once_the_store_has_written_it():
    """Regression: ingest stopped its server while the disk writes were still queued, and the
    state file listed chunks that never reached the disk tier."""
    from sglang_cacheblend.ingest.runner import wait_for_store_writes

    queued = [3, 1, 0]
    seen = []

    def stores():
        value = queued.pop(0) if len(queued) > 1 else queued[0]
        seen.append(value)
        return [{"queued_writes": value}]

    with _server_info(stores) as url:
        wait_for_store_writes(url, timeout_s=10)
        assert seen == [3, 1, 0]  # polled until nothing was queued
        queued[:] = [5]
        with pytest.raises(RuntimeError, match="5 chunk writes queued"):
            wait_for_store_writes(url, timeout_s=0.3)


def test_a_context_family_is_part_of_the_state_key():
    plain = ingest_key("text", model="m")
    assert ingest_key("text", model="m", family=None) == plain  # old state files stay valid
    assert ingest_key("text", model="m", family="bm25-3") not in (
        plain, ingest_key("text", model="m", family="random-3"))


def test_bm25_and_random_neighbours_come_from_the_other_chunks_only():
    from sglang_cacheblend.ingest.neighbours import NeighbourIndex, parse_family

    texts = ["the river flows to the sea", "a train on the railway line",
             "river sea valley and mill", "honey bees in the hive"]
    index = NeighbourIndex(texts)
    assert index.context(parse_family("bm25:1"), texts[0], {0}) == [texts[2]]
    assert index.context(parse_family("bm25:1"), texts[0], {0, 2}) != [texts[2]]
    drawn = index.context(parse_family("random:2"), texts[0], {0})
    assert len(drawn) == 2 and texts[0] not in drawn
    assert drawn == index.context(parse_family("random:2"), texts[0], {0})  # seeded by text
    # The lazy exclusion draws exactly what the materialised list of allowed indices would.
    import random

    from sglang_cacheblend.ingest.neighbours import _Without

    kept = _Without(50, {0, 7, 8, 9, 49})
    assert list(kept) == [i for i in range(50) if i not in {0, 7, 8, 9, 49}]
    assert random.Random(3).sample(kept, 6) == random.Random(3).sample(list(kept), 6)
    for bad in ("own", "bm25", "bm25:0", "random:x"):
        with pytest.raises(ValueError):
            parse_family(bad)


def test_a_batch_the_store_did_not_store_is_not_recorded(tmp_path):
    """Issue 25 G8: ingest recorded a batch once the writer queue was empty, whether or not
    the tiers stored it (a full disk, a declined entry, a full queue): a resumed ingest then
    skipped chunks no tier held. The store's ``unstored_writes`` (all ranks) now decides."""
    from sglang_cacheblend.ingest.runner import check_stored, wait_for_store_writes

    ranks = [{"queued_writes": 0, "unstored_writes": 2}, {"unstored_writes": 1}]
    with _server_info(lambda: ranks) as url:
        before = wait_for_store_writes(url, timeout_s=10)
        assert before == 3  # every rank's store counts
        check_stored(before, wait_for_store_writes(url, timeout_s=10))  # nothing lost: fine
        ranks[1]["unstored_writes"] = 2
        with pytest.raises(RuntimeError, match="did not store 1 chunk write"):
            check_stored(before, wait_for_store_writes(url, timeout_s=10))

    plan = _plan(4)
    sent = []

    def loses_the_second_batch(batch):
        sent.append(batch)
        if len(sent) == 2:
            check_stored(0, 1)  # the store reports one write of this batch not stored

    path = tmp_path / "state.jsonl"
    with IngestState(path) as state:
        result = precompute_batches(list(zip(plan.keys, plan.chunks)), loses_the_second_batch,
                                    state, batch=2, progress=False)
    assert result.precomputed == 2 and "did not store" in result.error
    with IngestState(path) as state:
        assert [c.doc_id for k, c in zip(plan.keys, plan.chunks) if k not in state] == ["d2", "d3"]
