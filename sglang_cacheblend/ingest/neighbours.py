"""Each chunk's own context for a context family: seeded random passages or BM25 neighbours.

A context family (``precompute_hints(context_family=..., context_ids=...)``) files every chunk
under one name with KV computed after a context of its own. This module picks those contexts
from a collection of passages, for corpus ingest and for the eval alike:

- ``random:N``: N passages drawn with a seed taken from the chunk's text, so a chunk always gets
  the same context, whatever run or prompt it is in;
- ``bm25:N``: the chunk's N best BM25 matches (``bm25s``, English stopwords), the chunk's text as
  the query, the best one last so it sits right before the chunk.

The caller says which passages a chunk must not use (at least the chunk itself); picking costs
O(N + excluded) per chunk, never a list of every allowed passage, so ingesting a large corpus
stays linear. Passages are joined like prompt passages (a blank line after each) and tokenized
one by one.
"""

from __future__ import annotations

import bisect
import hashlib
import random
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass
from functools import cached_property

from sglang_cacheblend.chunks import check_family

__all__ = ["FAMILY_KINDS", "FamilySpec", "NeighbourIndex", "context_ids", "parse_family"]

FAMILY_KINDS = ("random", "bm25")
SEPARATOR = "\n\n"


@dataclass(frozen=True)
class FamilySpec:
    """A kind of per-chunk context and how many passages it holds (0 for ``own``, the eval's
    upper bound, which has no count)."""

    kind: str
    passages: int = 0

    @property
    def name(self) -> str:
        """The family's name on the server."""
        return check_family(f"{self.kind}-{self.passages}" if self.passages else self.kind)


def parse_family(text: str, kinds: Sequence[str] = FAMILY_KINDS,
                 counted: Sequence[str] = FAMILY_KINDS) -> FamilySpec:
    """``KIND:N`` for the ``counted`` kinds, a bare kind for the others (the eval's ``own``), as
    a :class:`FamilySpec`; ``ValueError`` naming the problem otherwise."""
    kind, _, count = text.partition(":")
    if kind not in kinds:
        raise ValueError(f"family {text!r}: the kind must be one of {list(kinds)}")
    if kind not in counted:
        if count:
            raise ValueError(f"family {kind!r} takes no passage count")
        return FamilySpec(kind)
    if not count.isdigit() or int(count) < 1:
        raise ValueError(f"family {text!r}: give a passage count >= 1, e.g. {kind}:3")
    return FamilySpec(kind, int(count))


class NeighbourIndex:
    """Passages to draw contexts from, with a BM25 index built on first use."""

    def __init__(self, texts: Sequence[str]) -> None:
        self.texts = tuple(texts)

    def __len__(self) -> int:
        return len(self.texts)

    @cached_property
    def _bm25(self):
        import bm25s

        retriever = bm25s.BM25()
        retriever.index(bm25s.tokenize(list(self.texts), stopwords="en", show_progress=False),
                        show_progress=False)
        return retriever

    def context(self, spec: FamilySpec, chunk: str, exclude: Collection[int]) -> list[str]:
        """The passages ``chunk``'s KV is computed after under ``spec`` (a ``random`` or
        ``bm25`` family), never one of the ``exclude`` indices."""
        allowed = _Without(len(self), exclude)
        if len(allowed) < spec.passages:
            raise ValueError(f"{spec.kind}:{spec.passages} needs {spec.passages} passages; only "
                             f"{len(allowed)} may be used")
        if spec.kind == "random":
            seed = hashlib.blake2b(chunk.encode(), digest_size=8).digest()
            return [self.texts[i] for i in random.Random(seed).sample(allowed, spec.passages)]
        if spec.kind == "bm25":
            return self._neighbours(chunk, allowed, spec.passages)
        raise ValueError(f"no {spec.kind!r} contexts here; kinds: {list(FAMILY_KINDS)}")

    def _neighbours(self, chunk: str, allowed: _Without, n: int) -> list[str]:
        import bm25s

        query = bm25s.tokenize([chunk], stopwords="en", show_progress=False)
        depth = min(len(self), n + allowed.excluded)  # deep enough to skip the excluded
        docs, _ = self._bm25.retrieve(query, k=depth, show_progress=False)
        best = [int(d) for d in docs[0] if int(d) in allowed][:n]
        return [self.texts[i] for i in reversed(best)]


class _Without(Sequence):
    """``0..size-1`` without some indices, in order, as a lazy sequence: ``random.sample``
    draws from it by position, so a draw equals one from the materialised list."""

    def __init__(self, size: int, exclude: Collection[int]) -> None:
        self._size = size
        self._gone = sorted({i for i in exclude if 0 <= i < size})

    @property
    def excluded(self) -> int:
        return len(self._gone)

    def __len__(self) -> int:
        return self._size - len(self._gone)

    def __getitem__(self, position):  # type: ignore[override]  # ints only: what sample uses
        if not 0 <= position < len(self):
            raise IndexError(position)
        # The kept index with ``position`` kept ones below it: the least fixed point of
        # i = position + (excluded indices <= i), reached from below.
        index = position
        while (after := position + bisect.bisect_right(self._gone, index)) != index:
            index = after
        return index

    def __contains__(self, index: object) -> bool:
        if not isinstance(index, int) or not 0 <= index < self._size:
            return False
        at = bisect.bisect_left(self._gone, index)
        return at == len(self._gone) or self._gone[at] != index


def context_ids(passages: Sequence[str], encode: Callable[[str], Sequence[int]]) -> list[int]:
    """Token ids of context passages, each tokenized on its own like a prompt's chunks."""
    return [t for p in passages for t in encode(p + SEPARATOR)]
