"""``sglang-cacheblend ingest``: precompute a corpus's chunks into a CacheBlend server.

Reads a JSONL file, a folder of .txt/.md files or a musique_dev JSON file, splits every document
into chunks (``--split paragraph|tokens|none``, with the served model's tokenizer), and stores
each chunk's standalone KV in the server's chunk index, ``--batch`` chunks per ``/generate``.
Later requests that mark a chunk's exact text (``cb.chunk(text)``) hit it wherever it sits;
``--chunks-out`` writes those texts. ``--context-family bm25:N`` (or ``random:N``) computes each
chunk after its own context instead, its N BM25 neighbours among the corpus's other chunks (or N
seeded random ones), filed under the family ``bm25-N``; requests then name the family
(``chunk_hints(spans, context_family="bm25-N")``).

The server: ``--url`` of a running ``--enable-cacheblend`` server, else one started here on
127.0.0.1 with ``--enable-cacheblend`` and every unknown argument (e.g. a persistent tier's
``--cacheblend-disk-tier-dir``; give the input first, so that no server flag's value is taken
for it). Without such a tier the KV lives only as long as that server (``--keep-server`` leaves
it serving).

Resumable: ``--state`` (default ``<input>.ingest-state.jsonl``) records every finished batch; a
rerun skips the chunks it holds, keyed by (text, model, cache_salt, extra_key, and the server's
chunk context or the context family), so Ctrl-C or a server death loses at most the batch in
flight. A server started here without a persistent tier holds none of an earlier run's chunks,
so then nothing is skipped.

What the server does with a chunk is read from its options, never assumed: a running server's
from its ``/server_info``, the one started here's from its flags, parsed by the server's own
flag table (:mod:`sglang_cacheblend.options`). A precomputed chunk's prompt is the sink, the
context it is computed after (the server's chunk context, or its own in a family) and the chunk.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from sglang_cacheblend.chunks.client import wait_for_store_writes
from sglang_cacheblend.ingest.batches import (
    IngestPlan,
    IngestSummary,
    plan_ingest,
    precompute_batches,
)
from sglang_cacheblend.ingest.corpus import SPLITS, Chunk, Codec, SplitConfig, read_documents
from sglang_cacheblend.ingest.neighbours import (
    FamilySpec,
    NeighbourIndex,
    context_ids,
    parse_family,
)
from sglang_cacheblend.ingest.state import IngestState, default_state_path
from sglang_cacheblend.options import ENABLE_FLAG, ServerOptions, parse_server_flags

__all__ = ["add_arguments", "keeps_chunks", "run", "summary_exit_code"]

DEFAULT_PORT = 30125


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add = parser.add_argument
    add("input", type=Path, help="a .jsonl file, a folder of .txt/.md files, or a musique_dev "
                                 ".json file")
    add("--text-field", default="text", help="JSONL: the field holding a document's text")
    add("--split", choices=SPLITS, default="paragraph",
        help="paragraph: blank-line paragraphs merged up to --max-tokens; tokens: windows of "
             "--window tokens; none: one chunk per document")
    add("--max-tokens", type=int, default=512, help="paragraph split: most tokens per chunk")
    add("--window", type=int, default=512, help="tokens split: tokens per window")
    add("--batch", type=int, default=8, help="chunks per precompute request")
    add("--state", type=Path, default=None,
        help="resume file (default: <input>.ingest-state.jsonl)")
    add("--fresh", action="store_true", help="start a new state file: precompute everything")
    add("--chunks-out", type=Path, default=None,
        help="write every chunk (doc id, index, text, tokens) here as JSONL: the texts to mark")
    add("--context-family", type=parse_family, default=None, metavar="KIND:N",
        help="bm25:N or random:N: compute each chunk after its own context (its N BM25 "
             "neighbours among the corpus's other chunks, or N seeded random ones), filed under "
             "the family KIND-N that requests name (default: the server's chunk context)")
    add("--cache-salt", default=None, help="cache_salt the reusing requests will send")
    add("--extra-key", default=None, help="extra_key the reusing requests will send")
    add("--url", default=None, help="a running --enable-cacheblend server (else one is started)")
    add("--port", type=int, default=DEFAULT_PORT, help="port of the server started here")
    add("--model-path", type=Path, default=None,
        help="model (and tokenizer) of the server started here; with --url, the tokenizer "
             "(default: the server's)")
    add("--keep-server", action="store_true",
        help="leave the server started here serving afterwards (Ctrl-C stops it)")
    add("--timeout", type=float, default=600.0, help="seconds per precompute request")
    add("--no-progress", action="store_true", help="no progress bars")


def keeps_chunks(options: ServerOptions) -> bool:
    """Whether a server with ``options`` has a tier that keeps chunk KV beyond its life."""
    return options.store.disk_dir is not None or options.store.mooncake_master is not None


def _model_identity(model_path: str | Path) -> str:
    path = Path(model_path).expanduser()
    return str(path.resolve()) if path.exists() else str(model_path)


@dataclass(frozen=True)
class _Target:
    """The server the chunks go to, as far as splitting and keying need it."""

    model_path: str  # what the server serves
    tokenizer_path: str
    min_chunk_tokens: int
    chunk_context: str  # the text the server computes chunk KV after ("": the sink only)
    keeps_earlier_chunks: bool  # may it hold what an earlier run precomputed?


def _running_server(url: str, model_path: Path | None) -> _Target:
    import requests

    info = requests.get(url + "/server_info", timeout=60).json()
    state = (info.get("internal_states") or [{}])[0].get("cacheblend") or {}
    if not state.get("enabled"):
        raise ValueError(f"{url} runs without CacheBlend (start it with --enable-cacheblend)")
    served = requests.get(url + "/model_info", timeout=60).json()
    tokenizer = model_path or served.get("tokenizer_path") or served["model_path"]
    return _Target(served["model_path"], str(tokenizer), int(state["min_chunk_tokens"]),
                   str(state["chunk_context"]), True)


def _own_server(args: argparse.Namespace, server_args: list[str]) -> _Target:
    from sglang_cacheblend.embedded_model import ensure_model

    model_path = str(args.model_path or ensure_model(getattr(args, "cache_dir", None)))
    options = parse_server_flags(server_args)
    return _Target(model_path, model_path, options.min_chunk_tokens, options.chunk_context,
                   keeps_chunks(options))


@dataclass(frozen=True)
class _Tokenizer:
    codec: Codec
    prefix_len: int  # tokens the server puts before a chunk: the sink and its chunk context
    max_chunk_tokens: int | None  # the model's context less that prefix (None: unknown)


def _tokenizer(tokenizer_path: str, chunk_context: str) -> _Tokenizer:
    from transformers import AutoTokenizer

    from sglang_cacheblend.chunks import sink_ids

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_path)
    codec = Codec(
        encode=lambda text: tokenizer.encode(text, add_special_tokens=False),
        decode=lambda ids: tokenizer.decode(ids, skip_special_tokens=False,
                                            clean_up_tokenization_spaces=False),
    )
    # As the server tokenizes them: the sink, then the context on its own (no special tokens).
    prefix_len = (len(sink_ids(tokenizer.bos_token_id, codec.encode))
                  + (len(codec.encode(chunk_context)) if chunk_context else 0))
    config = Path(tokenizer_path) / "config.json"
    context_len = None
    if config.exists():
        context_len = json.loads(config.read_text()).get("max_position_embeddings")
    return _Tokenizer(codec, prefix_len,
                      None if context_len is None else int(context_len) - prefix_len)


def _chunk_evictions(url: str) -> int | None:
    import requests

    try:
        info = requests.get(url + "/server_info", timeout=60).json()
        return int(info["internal_states"][0]["cacheblend"]["chunk_index"]["evictions"])
    except (requests.RequestException, KeyError, IndexError, TypeError, ValueError):
        return None


def _write_chunks(path: Path, plan: IngestPlan) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        f.writelines(json.dumps({"doc_id": c.doc_id, "index": c.index, "text": c.text,
                                 "num_tokens": c.num_tokens}, ensure_ascii=False) + "\n"
                     for c in plan.chunks)


def _check(args: argparse.Namespace, server_args: list[str]) -> None:
    if args.url and server_args:
        raise ValueError(f"server flags {server_args} need a server started here, not --url")
    if args.url and args.keep_server:
        raise ValueError("--keep-server keeps a server started here; --url names a running one")
    if args.batch < 1:
        raise ValueError("--batch must be >= 1")
    if args.timeout <= 0:
        raise ValueError("--timeout must be > 0")


@dataclass(frozen=True)
class _Job:
    """One run's plan and what it still has to send."""

    args: argparse.Namespace
    plan: IngestPlan
    pending: list[tuple[str, Chunk]]
    state: IngestState
    prefix_len: int  # the sink and the server's chunk context, before every chunk
    started: float  # time.perf_counter() at the start of the run
    contexts: _Contexts | None = None  # with --context-family


class _Contexts:
    """Each chunk's own context under ``--context-family``: passages among the corpus's other
    chunks (:mod:`.neighbours`), as token ids."""

    def __init__(self, family: FamilySpec, plan: IngestPlan, codec: Codec) -> None:
        self.family = family
        self._index = NeighbourIndex([c.text for c in plan.chunks])
        self._position = {c.text: i for i, c in enumerate(plan.chunks)}
        self._encode = codec.encode

    def ids(self, chunk: Chunk) -> list[int]:
        me = self._position[chunk.text]
        return context_ids(self._index.context(self.family, chunk.text, {me}), self._encode)


def run(args: argparse.Namespace, server_args: list[str]) -> IngestSummary:
    """Ingest ``args.input`` (module docstring); prints the summary and returns it."""
    _check(args, server_args)
    started = time.perf_counter()
    docs = read_documents(args.input, text_field=args.text_field)
    url = args.url.rstrip("/") if args.url else None
    target = _running_server(url, args.model_path) if url else _own_server(args, server_args)
    family: FamilySpec | None = args.context_family
    chunk_context = "" if family else target.chunk_context  # a family replaces the server's
    tokenizer = _tokenizer(target.tokenizer_path, chunk_context)
    split = SplitConfig(args.split, max_tokens=args.max_tokens, window=args.window,
                        min_tokens=target.min_chunk_tokens,
                        max_chunk_tokens=tokenizer.max_chunk_tokens)
    plan = plan_ingest(docs, tokenizer.codec, split, model=_model_identity(target.model_path),
                       cache_salt=args.cache_salt, extra_key=args.extra_key,
                       chunk_context=chunk_context, family=family.name if family else None)
    if args.chunks_out:
        _write_chunks(args.chunks_out, plan)
    state_path = args.state or default_state_path(args.input)
    with IngestState(state_path, fresh=args.fresh) as state:
        if state.dropped_partial_line:
            print(f"{state_path}: dropped a cut-off last line", flush=True)
        done = [key in state for key in plan.keys]
        if any(done) and not target.keeps_earlier_chunks:
            print(f"note: {sum(done)} chunks recorded in {state_path} are precomputed again: "
                  "a server started here without a persistent tier holds none of them",
                  flush=True)
            done = [False] * len(done)
        pending = [(k, c) for k, c, d in zip(plan.keys, plan.chunks, done) if not d]
        contexts = None if family is None else _Contexts(family, plan, tokenizer.codec)
        job = _Job(args, plan, pending, state, tokenizer.prefix_len, started, contexts)
        if url or (not pending and not args.keep_server):
            return _ingest(job, url)
        return _ingest_own_server(job, server_args, target)


def _ingest_own_server(job: _Job, server_args: list[str], target: _Target) -> IngestSummary:
    from sglang_cacheblend.launch import ServerProcess

    args = job.args
    if not target.keeps_earlier_chunks:
        print("warning: no --cacheblend-disk-tier-dir or --cacheblend-mooncake-master given: "
              "the ingested KV lives only as long as the server started here"
              + (" (--keep-server: until you stop it)" if args.keep_server
                 else ", which stops when ingest ends (--keep-server leaves it serving)"),
              flush=True)
    flags = server_args if ENABLE_FLAG in server_args else [ENABLE_FLAG, *server_args]
    log_path = Path(tempfile.gettempdir()) / "sglang-cacheblend-ingest-server.log"
    print(f"starting SGLang with CacheBlend: {target.model_path} on 127.0.0.1:{args.port} "
          f"(log: {log_path})", flush=True)
    server = ServerProcess(args=flags, port=args.port, model_path=Path(target.model_path),
                           log_path=log_path, progress=not args.no_progress)
    try:
        server.start()
        summary = _ingest(job, server.base_url)
        if args.keep_server and server.is_running():
            print(f"\nThe server keeps serving at {server.base_url} (Ctrl-C stops it).",
                  flush=True)
            server.wait()
    finally:
        server.stop()
    return summary


def _ingest(job: _Job, url: str | None) -> IngestSummary:
    """Send ``job.pending`` to ``url`` (None: nothing to send) and print the summary."""
    from sglang_cacheblend import chunks as chunks_pkg

    args, plan = job.args, job.plan

    def precompute(batch: list[Chunk]) -> None:
        # The queue is empty between batches; its count of unstored writes is the baseline.
        unstored_before = wait_for_store_writes(url, timeout_s=args.timeout)
        contexts = None if job.contexts is None else [job.contexts.ids(c) for c in batch]
        outputs = chunks_pkg.precompute_chunks(
            url, [c.text for c in batch], cache_salt=args.cache_salt, extra_key=args.extra_key,
            context_family=None if job.contexts is None else job.contexts.family.name,
            contexts=contexts, timeout=args.timeout)
        if not isinstance(outputs, list) or len(outputs) != len(batch):
            raise RuntimeError(f"the server answered {len(batch)} precomputes with {outputs!r}")
        _check_tokenized_alike(batch, outputs, [job.prefix_len + len(c) for c in contexts]
                               if contexts else [job.prefix_len] * len(batch))
        check_stored(unstored_before, wait_for_store_writes(url, timeout_s=args.timeout))

    evictions_before = _chunk_evictions(url) if url and job.pending else None
    result = precompute_batches(job.pending, precompute, job.state, batch=args.batch,
                                progress=not args.no_progress)
    evictions_after = _chunk_evictions(url) if evictions_before is not None else None
    summary = IngestSummary(
        documents=plan.documents, dropped_documents=len(plan.dropped), chunks=len(plan.chunks),
        duplicates=plan.duplicates, tokens=plan.tokens,
        skipped=len(plan.chunks) - len(job.pending), precomputed=result.precomputed,
        precomputed_tokens=result.precomputed_tokens, remaining=result.remaining,
        precompute_s=result.wall_s, wall_s=time.perf_counter() - job.started,
        state_path=str(job.state.path), interrupted=result.interrupted, error=result.error,
        chunk_evictions=None if evictions_after is None else evictions_after - evictions_before,
    )
    print(summary.render(), flush=True)
    return summary


def check_stored(unstored_before: int, unstored_after: int) -> None:
    """``RuntimeError`` when the server's store did not store some chunk writes since the
    batch began (a full disk, a tier that declined, a full writer queue): the batch is then
    not recorded as done, so a resumed ingest sends it again (issue 25 G8)."""
    if unstored_after > unstored_before:
        raise RuntimeError(f"the server's store did not store {unstored_after - unstored_before} "
                           "chunk write(s) of this batch (see its log and /server_info "
                           "store counters); the batch is not recorded")


def _check_tokenized_alike(batch: list[Chunk], outputs: list, prefix_lens: list[int]) -> None:
    """``RuntimeError`` unless the server tokenized every chunk into the ids counted here: its
    ``prompt_tokens`` for chunk ``i`` is ``prefix_lens[i]`` (the sink and the context the chunk
    is computed after) and the chunk. Another tokenizer would cut other windows."""
    for c, output, prefix_len in zip(batch, outputs, prefix_lens):
        served = (output.get("meta_info") or {}).get("prompt_tokens")
        if served is not None and served != prefix_len + c.num_tokens:
            raise RuntimeError(
                f"the server tokenized chunk {c.index} of {c.doc_id!r} into "
                f"{served - prefix_len} tokens, ingest into {c.num_tokens}: pass the server's "
                "tokenizer as --model-path")


def summary_exit_code(summary: IngestSummary) -> int:
    """0 when every chunk is in, 130 after Ctrl-C, 1 when an error stopped it."""
    if summary.interrupted:
        return 130
    return 0 if summary.ok else 1
