"""The text a server's chunk KV is computed after: the value of ``--cacheblend-chunk-context``.

``builtin[:N]`` is the first N paragraphs of the prose shipped with the package
(``chunk_context.txt``: encyclopedic text on unrelated topics, written for this project); a path
is a UTF-8 file; ``none`` is no text (standalone chunk KV, after the sink only). Read by the
settings table (:mod:`sglang_cacheblend.options`) when a server's options are built, so it sits
below every other module: no torch, no SGLang, nothing of this project.
"""

from __future__ import annotations

from functools import lru_cache
from importlib import resources
from pathlib import Path

__all__ = ["BUILTIN_CONTEXT", "builtin_context", "resolve_context"]

BUILTIN_CONTEXT = "builtin"
"""``--cacheblend-chunk-context builtin[:N]``: the first N paragraphs of the shipped text."""
_BUILTIN_PARAGRAPHS = 3
_SEPARATOR = "\n\n"


@lru_cache(maxsize=1)
def _builtin_paragraphs() -> tuple[str, ...]:
    text = resources.files("sglang_cacheblend").joinpath("chunk_context.txt").read_text(
        encoding="utf-8")
    return tuple(p.strip() for p in text.split(_SEPARATOR) if p.strip())


def builtin_context(paragraphs: int = _BUILTIN_PARAGRAPHS) -> str:
    """The first ``paragraphs`` of the shipped context (encyclopedic prose on unrelated
    topics, written for this project), each followed by a blank line like a RAG passage."""
    available = _builtin_paragraphs()
    if not 1 <= paragraphs <= len(available):
        raise ValueError(f"the builtin chunk context has {len(available)} paragraphs; "
                         f"asked for {paragraphs}")
    return "".join(p + _SEPARATOR for p in available[:paragraphs])


def resolve_context(value: str | None) -> str:
    """The context text of a ``--cacheblend-chunk-context`` value ("" for none).

    ``none`` (or empty): chunks are computed after the sink only; ``builtin`` or
    ``builtin:N``: the shipped text's first N paragraphs (3 by default); anything else: a
    UTF-8 text file, used as is. Raises ``ValueError`` naming the problem.
    """
    if value is None or value.strip() in ("", "none"):
        return ""
    value = value.strip()
    if value == BUILTIN_CONTEXT or value.startswith(BUILTIN_CONTEXT + ":"):
        count = value.partition(":")[2] or str(_BUILTIN_PARAGRAPHS)
        if not count.isdigit():
            raise ValueError(f"chunk context {value!r}: the paragraph count must be an integer")
        return builtin_context(int(count))
    path = Path(value)
    if not path.is_file():
        raise ValueError(f"chunk context {value!r} is neither 'none', 'builtin[:N]' nor a file")
    text = path.read_text(encoding="utf-8")
    if not text.strip():
        raise ValueError(f"chunk context file {value!r} is empty")
    return text
