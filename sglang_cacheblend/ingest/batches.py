"""What an ingest does, server aside: plan the chunks, precompute them in batches, sum it up.

:func:`plan_ingest` splits the documents, keys every chunk (:func:`.state.ingest_key`) and drops
repeats; :func:`precompute_batches` sends what the state file does not hold yet, batch by batch,
through a ``precompute(chunks)`` callable, and records each finished batch before the next one
goes out. Ctrl-C or an error (the server died, answered 400...) stops the loop with the batches
done recorded: the summary says what is left, and a rerun resumes there. Pure Python: the
server comes in as the callable.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from tqdm.auto import tqdm

from sglang_cacheblend.ingest.corpus import Chunk, Codec, Document, SplitConfig, split_document
from sglang_cacheblend.ingest.state import IngestState, StateRecord, ingest_key

__all__ = ["BatchResult", "IngestPlan", "IngestSummary", "plan_ingest", "precompute_batches"]

Precompute = Callable[[list[Chunk]], None]


@dataclass(frozen=True)
class IngestPlan:
    """The corpus as unique chunks, each with its state key (same order)."""

    documents: int
    dropped: tuple[str, ...]  # ids of documents shorter than a chunk's minimum
    chunks: tuple[Chunk, ...]
    keys: tuple[str, ...]
    duplicates: int  # chunks whose key an earlier chunk of the corpus has

    def __post_init__(self) -> None:
        assert len(self.chunks) == len(self.keys) == len(set(self.keys))

    @property
    def tokens(self) -> int:
        return sum(c.num_tokens for c in self.chunks)


def plan_ingest(docs: Sequence[Document], codec: Codec, split: SplitConfig, *, model: str,
                cache_salt: str | None = None, extra_key: str | None = None,
                chunk_context: str = "", family: str | None = None) -> IngestPlan:
    """The unique chunks of ``docs``, each keyed by :func:`.state.ingest_key` with the other
    arguments (``chunk_context``: the server's context text; ``family``: the context family
    that replaces it)."""
    chunks: list[Chunk] = []
    keys: list[str] = []
    seen: set[str] = set()
    dropped: list[str] = []
    duplicates = 0
    for doc in docs:
        pieces = split_document(doc, codec, split)
        if not pieces:
            dropped.append(doc.doc_id)
        for piece in pieces:
            key = ingest_key(piece.text, model=model, cache_salt=cache_salt,
                             extra_key=extra_key, chunk_context=chunk_context, family=family)
            if key in seen:
                duplicates += 1
                continue
            seen.add(key)
            chunks.append(piece)
            keys.append(key)
    return IngestPlan(len(docs), tuple(dropped), tuple(chunks), tuple(keys), duplicates)


@dataclass(frozen=True)
class BatchResult:
    """How far :func:`precompute_batches` got."""

    precomputed: int
    precomputed_tokens: int
    remaining: int  # chunks of the pending list not done
    wall_s: float
    interrupted: bool = False
    error: str | None = None


def precompute_batches(pending: Sequence[tuple[str, Chunk]], precompute: Precompute,
                       state: IngestState, *, batch: int, progress: bool = True) -> BatchResult:
    """Precompute ``(key, chunk)`` pairs ``batch`` at a time, recording each finished batch.

    Never raises for a failed batch or Ctrl-C: the result says what stopped it.
    """
    if batch < 1:
        raise ValueError(f"batch must be >= 1, got {batch}")
    done = done_tokens = 0
    interrupted, error = False, None
    started = time.perf_counter()
    bar = tqdm(total=len(pending), desc="precompute", unit="chunk", disable=not progress)
    try:
        for first in range(0, len(pending), batch):
            group = pending[first:first + batch]
            precompute([c for _, c in group])
            state.record(StateRecord(key, c.doc_id, c.index, c.num_tokens) for key, c in group)
            done += len(group)
            done_tokens += sum(c.num_tokens for _, c in group)
            bar.update(len(group))
            bar.set_postfix(tokens=done_tokens)
    except KeyboardInterrupt:
        interrupted = True
    except Exception as exc:  # noqa: BLE001 - reported in the summary; the state is kept
        error = f"{type(exc).__name__}: {exc}"
    finally:
        bar.close()
    return BatchResult(done, done_tokens, len(pending) - done, time.perf_counter() - started,
                       interrupted, error)


@dataclass(frozen=True)
class IngestSummary:
    """What one ``ingest`` run did. ``ok``: every chunk of the corpus is in the server."""

    documents: int
    dropped_documents: int
    chunks: int
    duplicates: int
    tokens: int
    skipped: int
    precomputed: int
    precomputed_tokens: int
    remaining: int
    precompute_s: float  # the batches alone
    wall_s: float  # the whole run: reading, splitting, server start, batches
    state_path: str
    interrupted: bool = False
    error: str | None = None
    chunk_evictions: int | None = None  # chunk-index evictions in the server meanwhile

    @property
    def ok(self) -> bool:
        return not (self.interrupted or self.error or self.remaining)

    @property
    def chunks_per_s(self) -> float:
        return self.precomputed / self.precompute_s if self.precompute_s > 0 else 0.0

    @property
    def tokens_per_s(self) -> float:
        return self.precomputed_tokens / self.precompute_s if self.precompute_s > 0 else 0.0

    def render(self) -> str:
        lines = [
            (f"documents     {self.documents} ({self.dropped_documents} dropped: shorter than "
             "a chunk's minimum)"),
            (f"chunks        {self.chunks} ({self.tokens} tokens; {self.duplicates} repeats "
             "left out)"),
            f"skipped       {self.skipped} (already in the state file)",
            f"precomputed   {self.precomputed} ({self.precomputed_tokens} tokens)",
            (f"wall time     {self.wall_s:.1f} s; precompute {self.precompute_s:.1f} s "
             f"({self.chunks_per_s:.2f} chunks/s, {self.tokens_per_s:.0f} tokens/s)"),
            f"state file    {self.state_path}",
        ]
        if self.chunk_evictions:
            lines.append(f"warning: the server evicted {self.chunk_evictions} chunks meanwhile "
                         "(its KV pool is smaller than the corpus)")
        if self.interrupted:
            lines.append(f"interrupted: {self.remaining} chunks left; rerun to resume")
        elif self.error:
            lines.append(f"stopped by {self.error}; {self.remaining} chunks left; rerun to "
                         "resume")
        return "\n".join(lines)
