"""``sglang-cacheblend ingest`` against a real server: what it stores is what requests hit.

Uses the session ``server`` (the shipped defaults, so chunk KV is computed after the builtin
chunk context) under a cache_salt of this module's own, so no other test's chunks count. The
module fixture ingests a small JSONL corpus once; the tests then mark several of its chunks in
an order no request used, rerun the ingest, and send token windows whose server-side
tokenization the ingest checks against its own. One test ingests a folder into a disk tier
through a server the ingest starts itself, then serves it from a restarted one.
"""

from __future__ import annotations

import json
import re
import uuid
from pathlib import Path

import pytest
import requests

from sglang_cacheblend.chunks import chunk
from sglang_cacheblend.cli import build_parser, main
from tests.conftest import SHIPPED_BLEND_ARGS, free_port, running_server

DOCS = [
    {"id": "seine", "text": "Paris lies on the Seine, which flows through the city from east to "
                            "west and divides it into the Left Bank and the Right Bank.\n\n"
                            "Its bridges, from the Pont Neuf to the Pont Alexandre III, are among "
                            "the most visited sights of the French capital."},
    {"id": "alps", "text": "Alps\n\nThe Alps are the highest and most extensive mountain range "
                           "lying entirely in Europe, stretching about 1,200 km across eight "
                           "countries."},
    {"id": "danube", "text": "The Danube is the second-longest river in Europe, after the Volga. "
                             "It flows through much of Central and Southeastern Europe, from the "
                             "Black Forest into the Black Sea."},
    {"text": "Lake Geneva is a deep lake on the north side of the Alps, shared between "
             "Switzerland and France, and one of the largest lakes in Western Europe."},
]


def _chunk_inserts(server) -> int:
    info = requests.get(server.base_url + "/server_info", timeout=60).json()
    return info["internal_states"][0]["cacheblend"]["chunk_index"]["inserts"]


def _argv(corpus: Path, server, salt: str, tmp: Path, *extra: str) -> list[str]:
    return ["ingest", str(corpus), "--url", server.base_url, "--cache-salt", salt,
            "--state", str(tmp / "state.jsonl"), "--chunks-out", str(tmp / "chunks.jsonl"),
            "--batch", "3", "--max-tokens", "40", "--no-progress", *extra]


@pytest.fixture(scope="module")
def ingested(server, tmp_path_factory):
    from sglang_cacheblend.ingest import runner

    tmp = tmp_path_factory.mktemp("ingest")
    corpus = tmp / "corpus.jsonl"
    corpus.write_text("".join(json.dumps(d) + "\n" for d in DOCS))
    salt = f"ingest-{uuid.uuid4().hex}"
    inserts = _chunk_inserts(server)
    args, rest = build_parser().parse_known_args(_argv(corpus, server, salt, tmp))
    summary = runner.run(args, rest)
    chunks = [json.loads(line) for line in (tmp / "chunks.jsonl").read_text().splitlines()]
    return summary, chunks, salt, corpus, tmp, _chunk_inserts(server) - inserts


def test_ingest_stores_every_chunk_of_the_corpus(ingested):
    summary, chunks, _, _, _, inserted = ingested
    assert summary.ok and summary.documents == 4 and summary.dropped_documents == 0
    # "seine" has two paragraphs over 40 tokens together; "alps" opens with a one-word heading,
    # which joins the next paragraph (never a chunk below the server's 16 tokens).
    assert [c["doc_id"] for c in chunks] == ["seine", "seine", "alps", "danube",
                                             "corpus.jsonl:4"]
    assert chunks[2]["text"].startswith("Alps\n\nThe Alps")
    assert all(c["num_tokens"] >= 16 for c in chunks)
    assert summary.chunks == summary.precomputed == len(chunks) and summary.skipped == 0
    assert summary.tokens == sum(c["num_tokens"] for c in chunks)
    assert inserted == len(chunks)  # each one really reached the chunk index


def test_ingested_chunks_hit_in_an_order_never_used(ingested, server):
    _, chunks, salt, _, _, _ = ingested
    order = [4, 2, 0, 3]  # across documents, none in its corpus order
    text = ("Passages:\n" + "".join(chunk(chunks[i]["text"]) for i in order)
            + "\nQuestion: Which river flows through Paris?")

    def blend_report(cache_salt: str) -> dict:
        reply = requests.post(server.base_url + "/generate", timeout=600, json={
            "text": text, "cache_salt": cache_salt,
            "sampling_params": {"temperature": 0, "max_new_tokens": 1}})
        assert reply.status_code == 200, reply.text
        return reply.json()["meta_info"]["cacheblend"][0]

    report = blend_report(salt)
    assert report["chunks"] == report["chunk_hits"] == len(order)
    assert report["chunk_misses"] == 0  # (too few tokens to blend: the hits are what counts)
    # Under another salt nothing was ingested: the same prompt misses every chunk.
    other = blend_report(f"other-{uuid.uuid4().hex}")
    assert other["chunk_hits"] == 0 and other["chunk_misses"] == len(order)


def test_rerun_skips_everything_and_sends_nothing(ingested, server, capsys):
    _, chunks, salt, corpus, tmp, _ = ingested
    inserts = _chunk_inserts(server)
    assert main(_argv(corpus, server, salt, tmp)) == 0
    out = capsys.readouterr().out
    assert re.search(rf"skipped\s+{len(chunks)} ", out), out
    assert re.search(r"precomputed\s+0 ", out), out
    assert _chunk_inserts(server) == inserts


def test_token_windows_reach_the_server_as_the_ingest_counted_them(server, tmp_path):
    from sglang_cacheblend.ingest import runner

    text = "".join(f"Line {i}: Zürich’s Große Straße — naïve café, 東京と大阪の間, "
                   "unbelievably reorganisation-friendly text. " for i in range(5))
    corpus = tmp_path / "windows.jsonl"
    corpus.write_text(json.dumps({"id": "w", "text": text}) + "\n")
    args, rest = build_parser().parse_known_args(
        _argv(corpus, server, f"windows-{uuid.uuid4().hex}", tmp_path, "--split", "tokens",
              "--window", "24"))
    summary = runner.run(args, rest)
    windows = [json.loads(line) for line in (tmp_path / "chunks.jsonl").read_text().splitlines()]
    # ok: the server's prompt_tokens for every window equal sink + the ingest's count.
    assert summary.ok, summary.error
    assert summary.precomputed == len(windows) >= 4
    assert "".join(w["text"] for w in windows) == text


def test_ingest_into_a_context_family_files_each_chunk_after_its_bm25_neighbours(
        ingested, server, model_path, tmp_path):
    from transformers import AutoTokenizer

    from sglang_cacheblend.chunks import chunk_hints
    from sglang_cacheblend.ingest import runner

    _, chunks, _, corpus, _, _ = ingested
    salt = f"family-{uuid.uuid4().hex}"
    args, rest = build_parser().parse_known_args(
        _argv(corpus, server, salt, tmp_path, "--context-family", "bm25:1"))
    summary = runner.run(args, rest)
    assert summary.ok and summary.precomputed == len(chunks)
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    ids = [tokenizer.encode(c["text"], add_special_tokens=False) for c in chunks]
    prompt, spans = tokenizer.encode("Passages:\n", add_special_tokens=False), []
    for i in (3, 0, 4):
        spans.append((len(prompt), len(prompt) + len(ids[i])))
        prompt += ids[i]
    prompt += tokenizer.encode("\nQuestion: Which river flows through Paris?",
                               add_special_tokens=False)

    def sources(**hints) -> dict:
        reply = requests.post(server.base_url + "/generate", timeout=600, json={
            "input_ids": prompt, "cache_salt": salt,
            "kv_hints": chunk_hints(spans, recompute_ratio=0.15, **hints),
            "sampling_params": {"temperature": 0, "max_new_tokens": 1}})
        assert reply.status_code == 200, reply.text
        return reply.json()["meta_info"]["cacheblend"][0]

    report = sources(context_family="bm25-1")
    assert report["chunk_hits"] == 3 and report["chunk_context_family"] == "bm25-1", report
    # The family's chunks are not the salt's standalone chunks: those were never ingested.
    assert sources()["chunk_hits"] == 0
    # A rerun in the family skips everything.
    inserts = _chunk_inserts(server)
    assert main(_argv(corpus, server, salt, tmp_path, "--context-family", "bm25:1")) == 0
    assert _chunk_inserts(server) == inserts


FOLDER = {
    "doc0.txt": "The Rhine rises in the Swiss Alps and flows north through Lake Constance, then "
                "west along the border with Germany, past Basel, and north again through the "
                "Rhine valley between the Black Forest and the Vosges. Below Mainz it cuts a "
                "narrow gorge through the Rhenish Slate Mountains, famous for its castles, its "
                "vineyards and the rock of the Lorelei, before it widens past Cologne and "
                "Duisburg and splits into several arms in the Netherlands on its way to the "
                "North Sea.",
    "doc1.txt": "Lisbon is the capital of Portugal and lies on the estuary of the Tagus, where "
                "the river meets the Atlantic Ocean. An earthquake, a fire and a tsunami "
                "destroyed most of the city in 1755, and the Marquis of Pombal rebuilt its "
                "lower town on a grid of wide streets. Its hills are climbed by old yellow "
                "trams, and the tower of Belem and the Jeronimos monastery recall the voyages "
                "that left from its harbour in the age of discovery.",
    "doc2.txt": "The Baltic Sea is a shallow arm of the Atlantic Ocean enclosed by Sweden, "
                "Finland, Russia, the Baltic states, Poland, Germany and Denmark. Its water is "
                "brackish, because many rivers bring fresh water and only narrow straits join "
                "it to the North Sea, so few marine species live in its northern gulfs. In "
                "winter the Gulf of Bothnia freezes over, and icebreakers keep the ports of "
                "northern Sweden and Finland open for ships.",
}


def test_ingest_with_the_shipped_defaults_fills_a_disk_tier_a_restarted_server_serves(
        model_path, tmp_path):
    """Regression (issue 24): ``sglang-cacheblend ingest DIR`` against a server with the
    shipped default flags (chunk KV computed after the builtin context) stopped at its first
    batch, counting the context's tokens as the chunk's. Now every chunk lands in the disk tier
    the ingest's own server writes, and a server restarted on that tier serves all of them to
    a blended request that marks them, none computed again."""
    from sglang_cacheblend.ingest import runner

    folder, tier = tmp_path / "docs", tmp_path / "tier"
    folder.mkdir()
    for name, text in FOLDER.items():
        (folder / name).write_text(text)
    args, rest = build_parser().parse_known_args([
        "ingest", str(folder), "--split", "none", "--batch", "2", "--no-progress",
        "--port", str(free_port()), "--model-path", str(model_path),
        "--cacheblend-disk-tier-dir", str(tier)])
    summary = runner.run(args, rest)
    assert summary.error is None and summary.ok, summary.render()
    assert summary.precomputed == summary.chunks == len(FOLDER)
    assert len(list(tier.glob("*.safetensors"))) == len(FOLDER)

    log_dir = tmp_path / "restarted"
    log_dir.mkdir()
    with running_server(model_path, log_dir, [*SHIPPED_BLEND_ARGS,
                                              "--cacheblend-disk-tier-dir", str(tier)]) as server:
        text = ("Passages:\n" + "".join(chunk(FOLDER[name]) for name in sorted(FOLDER)[::-1])
                + "\nQuestion: Which river flows past Basel?")
        reply = requests.post(server.base_url + "/generate", timeout=600, json={
            "text": text, "sampling_params": {"temperature": 0, "max_new_tokens": 1}})
        assert reply.status_code == 200, reply.text
        report = reply.json()["meta_info"]["cacheblend"][0]
    assert report["blended"] and report["chunks"] == len(FOLDER), report
    assert report["chunk_context_tokens"] > 0, report  # the shipped context, not standalone KV
    assert report["chunk_sources"].get("disk") == len(FOLDER), report
    assert report["chunk_sources"]["computed"] == 0, report
