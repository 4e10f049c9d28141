"""The eval's context families: what each chunk of an evaluated prompt is computed after.

Beside the kinds ingest offers (``random:N``, ``bm25:N``; :mod:`sglang_cacheblend.ingest.
neighbours`), the eval has two more:

- ``fixed:N``: the first N paragraphs of the shipped chunk context (``builtin:N``) before every
  chunk, so context lengths are compared on one server (the server's own ``--cacheblend-chunk-
  context builtin:N`` tokenizes the text as a whole, these ids paragraph by paragraph);
- ``own``: the other passages of the evaluated prompt, in prompt order. Not a deployable context
  (it is the request itself), so it is an upper bound, labelled so, never a default.

The corpus is every distinct passage of the data file. ``random`` and ``bm25`` never use a
passage of the evaluated item (its whole retrieved list, not only the prompt's passages), so a
chunk is never conditioned on its own prompt.
"""

from __future__ import annotations

from collections.abc import Sequence

from sglang_cacheblend.context_text import builtin_context
from sglang_cacheblend.dataset import QAItem
from sglang_cacheblend.ingest.neighbours import (
    FAMILY_KINDS,
    FamilySpec,
    NeighbourIndex,
    context_ids,
)
from sglang_cacheblend.ingest.neighbours import parse_family as _parse

__all__ = ["EVAL_FAMILY_KINDS", "Corpus", "context_ids", "family_label", "parse_family"]

UPPER_BOUND = "own"
FIXED = "fixed"
EVAL_FAMILY_KINDS = (*FAMILY_KINDS, FIXED, UPPER_BOUND)


def parse_family(text: str) -> FamilySpec:
    """``random:N``, ``bm25:N``, ``fixed:N`` or ``own``."""
    return _parse(text, EVAL_FAMILY_KINDS, counted=(*FAMILY_KINDS, FIXED))


def family_label(spec: FamilySpec) -> str:
    """A family's mode prefix in the eval's tables; the upper bound says so."""
    return f"{spec.name} (upper bound)" if spec.kind == UPPER_BOUND else spec.name


class Corpus:
    """Every distinct passage of a data file, with the items each one was retrieved for."""

    def __init__(self, items: Sequence[QAItem]) -> None:
        owners: dict[str, set[int]] = {}
        for item in items:
            for text in item.passages:
                owners.setdefault(text, set()).add(item.index)
        self.index = NeighbourIndex(list(owners))
        self._owners = tuple(frozenset(o) for o in owners.values())

    @property
    def texts(self) -> tuple[str, ...]:
        return self.index.texts

    def __len__(self) -> int:
        return len(self.index)

    def own(self, item: QAItem) -> set[int]:
        """Indices of the passages retrieved for ``item``: its contexts never use them."""
        return {i for i, owners in enumerate(self._owners) if item.index in owners}

    def contexts(self, spec: FamilySpec, item: QAItem, chunks: Sequence[str]) -> list[list[str]]:
        """For each of ``chunks`` (the passages of ``item``'s prompt, in order), the passage
        texts its KV is computed after under ``spec``."""
        if spec.kind == UPPER_BOUND:
            return [[p for j, p in enumerate(chunks) if j != i] for i in range(len(chunks))]
        if spec.kind == FIXED:
            paragraphs = [p for p in builtin_context(spec.passages).split("\n\n") if p]
            return [list(paragraphs) for _ in chunks]
        own = self.own(item)
        return [self.index.context(spec, chunk, own) for chunk in chunks]
