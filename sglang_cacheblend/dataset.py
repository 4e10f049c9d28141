"""The musique_dev data format and the one RAG prompt built from it, by the demo, ingest and eval.

File format (``../shared/data/cacheblend_inputs/PROVENANCE.md``): a JSON list of
``{"question": str, "answers": [str, ...], "ctxs": [{"title": str, "text": str}, ...]}``.

The prompt is the one the benchmarks, tests and examples already send to the embedded
SmolLM2-Instruct (a ChatML model), written out as text so chunk markers stay in place::

    <|im_start|>system\\n{instruction}<|im_end|>\\n<|im_start|>user\\n     prefix
    {passage_1}\\n\\n ... {passage_k}\\n\\n                                  chunks, one per passage
    Question: {question}<|im_end|>\\n<|im_start|>assistant\\n             suffix

Each passage (with its trailing blank line) is one reusable chunk. Keeping the builder here means
the demo, the quality runner and the speed benchmark send the same prompt. This module sits
outside ``eval/`` because the product (``demo``, ``ingest``) reads the format too, and product
code never imports ``eval``; it imports neither torch nor SGLang.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sglang_cacheblend.chunks import ChunkedPrompt, Encode, Segment, chunk, tokenize_segments

DEFAULT_DATA_PATH = (
    Path(__file__).resolve().parents[1].parent / "shared" / "data" / "cacheblend_inputs"
    / "musique_dev.json"
)
"""``musique_dev.json`` beside this checkout (``<repo>/../shared/data/cacheblend_inputs``)."""

INSTRUCTION = "Answer the question from the passages."
PASSAGE_SEPARATOR = "\n\n"


@dataclass(frozen=True)
class QAItem:
    """One question with its gold answers and retrieved passages (in file order)."""

    index: int
    question: str
    answers: tuple[str, ...]
    passages: tuple[str, ...]


def load_items(path: Path | str = DEFAULT_DATA_PATH) -> list[QAItem]:
    """Read and validate a musique_dev-format file.

    Raises ``ValueError`` naming the file, the item and the field for anything malformed:
    not a list, a missing or mistyped field, no answers, no passages, an empty passage text.
    ``FileNotFoundError`` when the file is absent.
    """
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path}: not valid JSON ({exc})") from exc
    if not isinstance(data, list) or not data:
        raise ValueError(f"{path}: expected a non-empty JSON list of items")
    return [_parse_item(raw, i, path) for i, raw in enumerate(data)]


def _parse_item(raw: Any, index: int, path: Path) -> QAItem:
    where = f"{path}: item {index}"
    if not isinstance(raw, dict):
        raise ValueError(f"{where}: expected an object, got {type(raw).__name__}")
    for field, kind in (("question", str), ("answers", list), ("ctxs", list)):
        if field not in raw:
            raise ValueError(f"{where}: missing field {field!r}")
        if not isinstance(raw[field], kind):
            raise ValueError(f"{where}: {field!r} must be a {kind.__name__}")
    if not raw["question"].strip():
        raise ValueError(f"{where}: 'question' is empty")
    answers = raw["answers"]
    if not answers or not all(isinstance(a, str) for a in answers):
        raise ValueError(f"{where}: 'answers' must be a non-empty list of str")
    if not raw["ctxs"]:
        raise ValueError(f"{where}: 'ctxs' is empty")
    passages = []
    for j, ctx in enumerate(raw["ctxs"]):
        if not isinstance(ctx, dict) or not isinstance(ctx.get("text"), str):
            raise ValueError(f"{where}: ctxs[{j}] must be an object with a str 'text'")
        if not ctx["text"].strip():
            raise ValueError(f"{where}: ctxs[{j}].text is empty")
        passages.append(ctx["text"])
    return QAItem(index, raw["question"], tuple(answers), tuple(passages))


@dataclass(frozen=True)
class RagPrompt:
    """A RAG prompt as pieces: ``prefix + passages[0] + ... + passages[-1] + suffix``.

    ``passages`` are the chunk texts exactly as they appear in the prompt (separator included).
    """

    prefix: str
    passages: tuple[str, ...]
    suffix: str

    def __post_init__(self) -> None:
        if not self.passages:
            raise ValueError("a RAG prompt needs at least one passage")

    def text(self) -> str:
        """The plain prompt text (what full prefill sees)."""
        return self.prefix + "".join(self.passages) + self.suffix

    def marked_text(self) -> str:
        """The prompt text with every passage wrapped in chunk markers (``cb.chunk``)."""
        return self.prefix + "".join(chunk(p) for p in self.passages) + self.suffix

    def segments(self) -> tuple[Segment, ...]:
        """The prompt as plain and chunk segments (for ``chunks.tokenize_segments``)."""
        return (
            Segment(self.prefix, False),
            *(Segment(p, True) for p in self.passages),
            Segment(self.suffix, False),
        )

    def reordered(self, order: Sequence[int]) -> RagPrompt:
        """The same prompt with the passages in ``order`` (a permutation of their indices)."""
        if sorted(order) != list(range(len(self.passages))):
            raise ValueError(
                f"order must be a permutation of 0..{len(self.passages) - 1}, got {list(order)}"
            )
        return RagPrompt(self.prefix, tuple(self.passages[i] for i in order), self.suffix)


def build_prompt(
    item: QAItem,
    *,
    num_passages: int | None = None,
    instruction: str = INSTRUCTION,
) -> RagPrompt:
    """The ChatML RAG prompt of ``item`` over its first ``num_passages`` passages (all if None)."""
    count = len(item.passages) if num_passages is None else num_passages
    if not 1 <= count <= len(item.passages):
        raise ValueError(
            f"num_passages must be in 1..{len(item.passages)} for item {item.index}, got {count}"
        )
    return rag_prompt(item.passages[:count], item.question, instruction=instruction)


def rag_prompt(
    passages: Sequence[str], question: str, *, instruction: str = INSTRUCTION
) -> RagPrompt:
    """The ChatML RAG prompt over arbitrary passage texts (each gets the blank-line separator)."""
    return RagPrompt(
        prefix=f"<|im_start|>system\n{instruction}<|im_end|>\n<|im_start|>user\n",
        passages=tuple(p + PASSAGE_SEPARATOR for p in passages),
        suffix=f"Question: {question}<|im_end|>\n<|im_start|>assistant\n",
    )


def encoder(tokenizer: Any) -> Encode:
    """``encode`` for :func:`tokenize_prompt`: ``tokenizer(text, add_special_tokens=False)``.

    One definition, so every harness tokenizes the prompt pieces the same way (a tokenizer that
    added a BOS to each piece would put one before every chunk).
    """

    def encode(text: str) -> list[int]:
        return tokenizer(text, add_special_tokens=False).input_ids

    return encode


def tokenize_prompt(prompt: RagPrompt, encode: Encode) -> ChunkedPrompt:
    """Token ids and chunk spans of ``prompt``, each piece tokenized on its own.

    ``encode`` must add no special tokens (:func:`encoder`); the ChatML text already carries
    them. For a tokenizer that adds none of its own to a prompt (SmolLM2), the result is what
    the server builds from :meth:`RagPrompt.marked_text`; ``chunk_hints(result.spans)`` marks
    the same chunks on ``result.input_ids``.
    """
    return tokenize_segments(prompt.segments(), encode)
