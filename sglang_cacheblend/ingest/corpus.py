"""Reading a corpus and cutting its documents into chunks the server can store.

Inputs (:func:`read_documents`): a JSONL file (one object a line, a text field and an optional
``id``), a folder of ``.txt``/``.md`` files (sorted by relative path, one document each), a
musique_dev-format JSON file (every passage of every item is a document), or one ``.txt``/``.md``
file.

Splits (:class:`SplitConfig`, :func:`split_document`):

* ``paragraph``: blank-line separated paragraphs, stripped, merged (joined by a blank line) up to
  ``max_tokens``; a paragraph longer than that is cut into token windows first. A chunk is never
  shorter than ``min_tokens`` (the server refuses shorter ones): a short paragraph joins the
  next one, a short last one the chunk before it, so a chunk may exceed ``max_tokens`` by fewer
  than ``min_tokens`` tokens plus the blank line.
* ``tokens``: windows of ``window`` token ids of the whole document. Each window's text encodes
  back to exactly its ids (the cut moves to the nearest boundary where decode/encode round-trips),
  the windows cover the document's ids with no gap or overlap, and no window is shorter than
  ``min_tokens``.
* ``none``: each document is one chunk, as it is (a corpus that is chunked already).

A document shorter than ``min_tokens`` yields no chunk (the summary counts it as dropped).
Pure Python: the tokenizer comes in as a :class:`Codec`.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from sglang_cacheblend.chunks import CHUNK_CLOSE, CHUNK_OPEN

__all__ = ["SPLITS", "Chunk", "Codec", "Document", "SplitConfig", "read_documents",
           "split_document", "split_paragraphs", "split_token_windows"]

SPLITS = ("paragraph", "tokens", "none")
FOLDER_SUFFIXES = (".txt", ".md")
PARAGRAPH_JOINER = "\n\n"
_BLANK_LINE = re.compile(r"\n[ \t\r\f\v]*\n")


@dataclass(frozen=True)
class Codec:
    """The served model's tokenizer as splitting needs it.

    ``encode`` adds no special tokens (the server tokenizes a chunk so); ``decode`` skips none
    and cleans up no spaces, so a decoded window is the document's text.
    """

    encode: Callable[[str], Sequence[int]]
    decode: Callable[[Sequence[int]], str]

    def count(self, text: str) -> int:
        return len(self.encode(text))


@dataclass(frozen=True)
class Document:
    doc_id: str
    text: str


@dataclass(frozen=True)
class Chunk:
    """One chunk to precompute: ``text`` is exactly what a later request must mark."""

    doc_id: str
    index: int  # within its document
    text: str
    num_tokens: int


@dataclass(frozen=True)
class SplitConfig:
    """How documents become chunks (module docstring). ``max_chunk_tokens``: the server's
    upper bound (its context less the sink); a longer chunk fails loudly."""

    mode: str = "paragraph"
    max_tokens: int = 512
    window: int = 512
    min_tokens: int = 16
    max_chunk_tokens: int | None = None

    def __post_init__(self) -> None:
        if self.mode not in SPLITS:
            raise ValueError(f"split must be one of {list(SPLITS)}, got {self.mode!r}")
        for name in ("max_tokens", "window", "min_tokens"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an int >= 1, got {value!r}")
        size = self.window if self.mode == "tokens" else self.max_tokens
        if self.mode != "none" and size < self.min_tokens:
            raise ValueError(f"chunks of {size} tokens are below the minimum of "
                             f"{self.min_tokens} the server accepts")
        if self.max_chunk_tokens is not None and self.mode != "none" and (
                size + self.min_tokens > self.max_chunk_tokens):
            raise ValueError(f"chunks of up to {size + self.min_tokens} tokens would exceed the "
                             f"server's limit of {self.max_chunk_tokens}")


# ------------------------------------------------------------------------------ reading


def read_documents(path: Path, *, text_field: str = "text") -> list[Document]:
    """The documents of ``path`` (module docstring); ``ValueError`` names the file and line or
    item for malformed input, and for a text holding the chunk markers."""
    path = Path(path)
    if path.is_dir():
        docs = _read_folder(path)
    elif path.suffix == ".jsonl":
        docs = _read_jsonl(path, text_field)
    elif path.suffix == ".json":
        docs = _read_musique(path)
    elif path.suffix in FOLDER_SUFFIXES:
        docs = [Document(path.name, path.read_text())]
    elif not path.exists():
        raise FileNotFoundError(f"{path}: no such file or folder")
    else:
        raise ValueError(f"{path}: expected a .jsonl file, a musique_dev .json file, a .txt/.md "
                         "file or a folder of them")
    for doc in docs:
        if CHUNK_OPEN in doc.text or CHUNK_CLOSE in doc.text:
            raise ValueError(f"{path}: document {doc.doc_id!r} holds a chunk marker "
                             f"({CHUNK_OPEN} or {CHUNK_CLOSE})")
    return docs


def _read_jsonl(path: Path, text_field: str) -> list[Document]:
    docs = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            where = f"{path}:{lineno}"
            try:
                raw = json.loads(line)
            except json.JSONDecodeError as exc:
                raise ValueError(f"{where}: not valid JSON ({exc})") from exc
            if not isinstance(raw, dict):
                raise ValueError(f"{where}: expected an object, got {type(raw).__name__}")
            text = raw.get(text_field)
            if not isinstance(text, str):
                raise ValueError(f"{where}: needs a str field {text_field!r} (--text-field)")
            doc_id = raw.get("id", f"{path.name}:{lineno}")
            docs.append(Document(str(doc_id), text))
    return docs


def _read_folder(path: Path) -> list[Document]:
    files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix in FOLDER_SUFFIXES)
    if not files:
        raise ValueError(f"{path}: no {'/'.join(FOLDER_SUFFIXES)} files")
    return [Document(str(p.relative_to(path)), p.read_text(encoding="utf-8")) for p in files]


def _read_musique(path: Path) -> list[Document]:
    from sglang_cacheblend.dataset import load_items

    return [Document(f"{item.index}.{j}", passage)
            for item in load_items(path) for j, passage in enumerate(item.passages)]


# ------------------------------------------------------------------------------ splitting


def split_document(doc: Document, codec: Codec, config: SplitConfig) -> list[Chunk]:
    """The chunks of ``doc`` under ``config`` (none if it is shorter than ``min_tokens``)."""
    if config.mode == "paragraph":
        texts = split_paragraphs(doc.text, codec, max_tokens=config.max_tokens,
                                 min_tokens=config.min_tokens)
    elif config.mode == "tokens":
        texts = split_token_windows(doc.text, codec, window=config.window,
                                    min_tokens=config.min_tokens)
    else:
        long_enough = bool(doc.text.strip()) and codec.count(doc.text) >= config.min_tokens
        texts = [doc.text] if long_enough else []
    chunks = [Chunk(doc.doc_id, i, text, codec.count(text)) for i, text in enumerate(texts)]
    for c in chunks:
        if config.max_chunk_tokens is not None and c.num_tokens > config.max_chunk_tokens:
            raise ValueError(f"document {doc.doc_id!r}: chunk {c.index} has {c.num_tokens} tokens, "
                             f"more than the server's limit of {config.max_chunk_tokens} "
                             "(split it: --split paragraph or tokens)")
    return chunks


def split_paragraphs(text: str, codec: Codec, *, max_tokens: int, min_tokens: int) -> list[str]:
    """Paragraphs merged up to ``max_tokens``, none below ``min_tokens`` (module docstring)."""
    # (joiner before the piece, piece): windows of one long paragraph join with "" (they are
    # consecutive slices of it), paragraphs with a blank line.
    pieces: list[tuple[str, str]] = []
    for paragraph in (p.strip() for p in _BLANK_LINE.split(text)):
        if not paragraph:
            continue
        if codec.count(paragraph) <= max_tokens:
            pieces.append((PARAGRAPH_JOINER, paragraph))
            continue
        windows = split_token_windows(paragraph, codec, window=max_tokens, min_tokens=min_tokens)
        pieces += [(PARAGRAPH_JOINER if i == 0 else "", w) for i, w in enumerate(windows)]
    chunks: list[str] = []
    current: str | None = None
    for joiner, piece in pieces:
        if current is None:
            current = piece
            continue
        merged = current + joiner + piece
        if codec.count(current) < min_tokens or codec.count(merged) <= max_tokens:
            current = merged
        else:
            chunks.append(current)
            current = piece
    if current is not None:
        if codec.count(current) >= min_tokens:
            chunks.append(current)
        elif chunks:  # a short last paragraph joins the chunk before it
            chunks[-1] = chunks[-1] + PARAGRAPH_JOINER + current
    return chunks


def split_token_windows(text: str, codec: Codec, *, window: int, min_tokens: int) -> list[str]:
    """Texts of consecutive windows of ``text``'s token ids (module docstring).

    Each window ends as close to ``window`` tokens as a round-tripping cut allows (shorter cuts
    first, then longer ones); a remainder shorter than ``min_tokens`` joins the last window.
    Raises ``ValueError`` if no cut round-trips.
    """
    ids = list(codec.encode(text))
    if len(ids) < min_tokens:
        return []
    texts: list[str] = []
    start = 0
    while start < len(ids):
        end = _round_trip_cut(ids, start, codec, window=window, min_tokens=min_tokens)
        piece = codec.decode(ids[start:end])
        if piece.strip():  # whitespace alone cannot be a chunk
            texts.append(piece)
        start = end
    return texts


def _round_trip_cut(ids: list[int], start: int, codec: Codec, *, window: int,
                    min_tokens: int) -> int:
    """The end of the window opening at ``start``: see :func:`split_token_windows`."""
    total = len(ids)
    ideal = min(start + window, total)
    if total - ideal < min_tokens:
        ideal = total  # absorb a short remainder
    shorter = range(ideal, start + min_tokens - 1, -1)
    longer = range(ideal + 1, total + 1)
    for end in (*shorter, *longer):
        if 0 < total - end < min_tokens:
            continue  # would leave a remainder too short to be a chunk
        if list(codec.encode(codec.decode(ids[start:end]))) == ids[start:end]:
            return end
    raise ValueError(f"no cut after token {start} of {total} decodes to text that encodes back "
                     "to the same ids")
