"""Per-chunk contexts for context families: what each chunk's KV is computed after.

The fixed chunk context (``--cacheblend-chunk-context``) gives every chunk the same preceding
text. A context family gives each chunk its own, computed here on the client side and sent with
the chunk's precompute request (``precompute_hints(context_family=..., context_ids=...)``):

- ``random:N``: N passages drawn from the corpus, seeded by the chunk's text (the same chunk
  always gets the same context, whatever prompt it is in);
- ``bm25:N``: the chunk's N nearest corpus passages by BM25 (``bm25s``), the chunk's own text
  as the query;
- ``own``: the other passages of the evaluated prompt, in prompt order. Not a deployable
  context (it is the request itself), so it is labelled an upper bound and never a default.

The corpus is every passage of the data file. ``random`` and ``bm25`` never use a passage of
the evaluated item (its whole retrieved list, not only the prompt's passages), so a chunk is
never conditioned on its own prompt. Context passages are separated like prompt passages.
"""

from __future__ import annotations

import hashlib
import random
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cached_property

from sglang_cacheblend.chunks import Encode, check_family
from sglang_cacheblend.eval.dataset import PASSAGE_SEPARATOR, QAItem

__all__ = ["FAMILY_KINDS", "Corpus", "FamilySpec", "parse_family"]

FAMILY_KINDS = ("random", "bm25", "own")


@dataclass(frozen=True)
class FamilySpec:
    """One family to evaluate: its kind and, for ``random``/``bm25``, how many passages."""

    kind: str
    passages: int = 0

    @property
    def name(self) -> str:
        """The family's name on the server (and the eval's mode prefix)."""
        return check_family(self.kind if self.kind == "own" else f"{self.kind}-{self.passages}")

    @property
    def upper_bound(self) -> bool:
        return self.kind == "own"


def parse_family(text: str) -> FamilySpec:
    """``random:N``, ``bm25:N`` or ``own`` as a :class:`FamilySpec`; ``ValueError`` otherwise."""
    kind, _, count = text.partition(":")
    if kind not in FAMILY_KINDS:
        raise ValueError(f"family {text!r}: the kind must be one of {list(FAMILY_KINDS)}")
    if kind == "own":
        if count:
            raise ValueError("family 'own' takes no count: it is the prompt's other passages")
        return FamilySpec("own")
    if not count.isdigit() or int(count) < 1:
        raise ValueError(f"family {text!r}: give a passage count >= 1, e.g. {kind}:3")
    return FamilySpec(kind, int(count))


class Corpus:
    """Every distinct passage of a data file, with the items each one was retrieved for."""

    def __init__(self, items: Sequence[QAItem]) -> None:
        index: dict[str, int] = {}
        owners: list[set[int]] = []
        for item in items:
            for text in item.passages:
                if text not in index:
                    index[text] = len(owners)
                    owners.append(set())
                owners[index[text]].add(item.index)
        self.texts: tuple[str, ...] = tuple(index)
        self._owners = tuple(frozenset(o) for o in owners)

    def __len__(self) -> int:
        return len(self.texts)

    def foreign(self, item: QAItem) -> list[int]:
        """Indices of the passages that were not retrieved for ``item``."""
        return [i for i, owners in enumerate(self._owners) if item.index not in owners]

    @cached_property
    def _bm25(self):
        import bm25s

        retriever = bm25s.BM25()
        retriever.index(bm25s.tokenize(list(self.texts), stopwords="en", show_progress=False),
                        show_progress=False)
        return retriever

    def contexts(self, spec: FamilySpec, item: QAItem, chunks: Sequence[str]) -> list[list[str]]:
        """For each of ``chunks`` (the passages of ``item``'s prompt, in order), the passage
        texts its KV is computed after under ``spec``."""
        if spec.kind == "own":
            return [[p for j, p in enumerate(chunks) if j != i] for i in range(len(chunks))]
        allowed = self.foreign(item)
        if len(allowed) < spec.passages:
            raise ValueError(f"the corpus has {len(allowed)} passages outside item "
                             f"{item.index}; {spec.kind}:{spec.passages} needs more")
        if spec.kind == "random":
            return [[self.texts[i] for i in _seeded(chunk).sample(allowed, spec.passages)]
                    for chunk in chunks]
        return [self._neighbours(chunk, set(allowed), spec.passages) for chunk in chunks]

    def _neighbours(self, chunk: str, allowed: set[int], n: int) -> list[str]:
        """The ``n`` best BM25 matches of ``chunk`` among ``allowed`` passages, best last (the
        closest text sits right before the chunk)."""
        import bm25s

        query = bm25s.tokenize([chunk], stopwords="en", show_progress=False)
        depth = min(len(self), n + len(self) - len(allowed))  # enough to skip the forbidden
        docs, _ = self._bm25.retrieve(query, k=depth, show_progress=False)
        best = [int(d) for d in docs[0] if int(d) in allowed][:n]
        return [self.texts[i] for i in reversed(best)]


def context_ids(passages: Sequence[str], encode: Encode) -> list[int]:
    """Token ids of context passages, each tokenized on its own like a prompt's chunks."""
    return [t for p in passages for t in encode(p + PASSAGE_SEPARATOR)]


def _seeded(chunk: str) -> random.Random:
    return random.Random(hashlib.blake2b(chunk.encode(), digest_size=8).digest())
