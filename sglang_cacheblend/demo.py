"""``sglang-cacheblend demo``: CacheBlend end to end on a real server, beside what SGLang does.

The server runs with ``--enable-cacheblend``. The passages are precomputed into the chunk index
(as a RAG service would do at ingest), then one question is asked with the passages in an order
no request has used, three ways, and the demo prints side by side what each did:

* **full prefill**: the plain prompt under a fresh ``cache_salt`` (nothing cached);
* **SGLang's prefix cache**: the plain prompt after the same passages were sent in their
  original order (only the text before the first passage that moved is reused);
* **CacheBlend**: the same prompt with every passage marked as a chunk: every chunk hits
  wherever it sits, and only the selected rows are recomputed.

All three send the same token ids, each passage tokenized on its own as chunks are.

TTFT is timed on the client: the first streamed token of each answer. Absolute seconds on a
shared CPU are noisy; the benchmarks (``sglang-cacheblend bench``) measure ratios properly.
"""

from __future__ import annotations

import argparse
import json
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import requests
from tqdm.auto import tqdm

from sglang_cacheblend.chunks import chunk_hints, precompute_chunks
from sglang_cacheblend.dataset import encoder, load_items, rag_prompt, tokenize_prompt

__all__ = ["DEMO_DATA", "DemoRow", "add_arguments", "compare", "load_passages", "render",
           "run_demo"]

DEMO_DATA = Path(__file__).with_name("demo_passages.json")
MAX_NEW_TOKENS = 24
TIMEOUT = 600


@dataclass(frozen=True)
class DemoRow:
    """What one mode did for the question."""

    mode: str
    ttft_s: float
    answer: str
    cached_tokens: int
    prompt_tokens: int
    chunk_hits: int | None = None
    chunks: int | None = None
    recomputed_share: float | None = None  # rows computed / rows of a full prefill
    blended: bool | None = None


def load_passages(path: Path | None, question: str | None) -> tuple[list[str], str]:
    """Passages and question: the bundled musique item, or ``path`` (a JSON list of strings, a
    musique_dev-format file, or text with passages separated by blank lines)."""
    if path is None:
        item = load_items(DEMO_DATA)[0]
        return list(item.passages), question or item.question
    text = Path(path).read_text()
    try:
        data = json.loads(text)
    except json.JSONDecodeError:
        data = None
    if isinstance(data, list) and data and all(isinstance(p, str) for p in data):
        passages = data
    elif data is not None:
        item = load_items(path)[0]
        passages, question = list(item.passages), question or item.question
    else:
        passages = [p.strip() for p in text.split("\n\n") if p.strip()]
    if not passages:
        raise ValueError(f"{path}: no passages")
    if not question:
        raise ValueError("--question is needed with a passages file that holds no question")
    return passages, question


def _stream(base_url: str, body: dict[str, Any]) -> tuple[float, str, dict[str, Any]]:
    """Send one streamed ``/generate``; (seconds to the first token, answer, meta_info)."""
    body = {**body, "stream": True,
            "sampling_params": {"temperature": 0, "max_new_tokens": MAX_NEW_TOKENS}}
    started = time.perf_counter()
    ttft, last = None, {}
    with requests.post(base_url + "/generate", json=body, stream=True, timeout=TIMEOUT) as reply:
        if reply.status_code != 200:
            raise RuntimeError(f"/generate answered {reply.status_code}: {reply.text[:300]}")
        for line in reply.iter_lines():
            if not line.startswith(b"data:") or line.strip() == b"data: [DONE]":
                continue
            if ttft is None:
                ttft = time.perf_counter() - started
            last = json.loads(line[len(b"data:"):])
    return ttft or 0.0, last.get("text", "").strip(), last.get("meta_info", {})


def _row(mode: str, ttft: float, answer: str, meta: dict[str, Any]) -> DemoRow:
    reports = meta.get("cacheblend") or [None]
    report = reports[0] or {}
    full_rows = report.get("full_rows")
    share = None if not full_rows else report.get("recomputed_rows", 0) / full_rows
    return DemoRow(mode, ttft, answer, int(meta.get("cached_tokens", 0)),
                   int(meta.get("prompt_tokens", 0)), report.get("chunk_hits"),
                   report.get("chunks"), share, report.get("blended"))


def compare(base_url: str, passages: Sequence[str], question: str, tokenizer: Any,
            *, progress: bool = True) -> list[DemoRow]:
    """The three modes on one ``--enable-cacheblend`` server (module docstring).

    All three send the same token ids (each passage tokenized on its own, as chunks are), so
    their answers differ only by how the prompt's KV was made.
    """
    base_url = base_url.rstrip("/")
    encode = encoder(tokenizer)
    prompt = rag_prompt(passages, question)
    order = list(range(len(passages)))[::-1] if len(passages) > 1 else [0]
    seen = tokenize_prompt(prompt, encode)
    asked = tokenize_prompt(prompt.reordered(order), encode)
    ids = list(asked.input_ids)
    blend_salt, prefix_salt = uuid.uuid4().hex, uuid.uuid4().hex
    _stream(base_url, {"text": "Hello", "cache_salt": uuid.uuid4().hex})  # warm, untimed
    for passage in tqdm(prompt.passages, desc="precompute chunks", unit="chunk",
                        disable=not progress):
        precompute_chunks(base_url, [passage], cache_salt=blend_salt)
    steps = tqdm(total=4, desc="ask the question", unit="request", disable=not progress)
    full = _row("full prefill", *_stream(base_url, {"input_ids": ids,
                                                     "cache_salt": uuid.uuid4().hex}))
    steps.update()
    _stream(base_url, {"input_ids": list(seen.input_ids), "cache_salt": prefix_salt})
    steps.update()  # the passages seen once, in their original order
    prefix = _row("SGLang prefix cache", *_stream(base_url, {"input_ids": ids,
                                                            "cache_salt": prefix_salt}))
    steps.update()
    blend = _row("CacheBlend", *_stream(base_url, {"input_ids": ids, "cache_salt": blend_salt,
                                                   "kv_hints": chunk_hints(asked.spans)}))
    steps.update()
    steps.close()
    return [full, prefix, blend]


def render(rows: Sequence[DemoRow], question: str) -> str:
    """The side-by-side table a user reads."""
    full = rows[0]
    lines = [f"question: {question}", "",
             f"{'mode':<20} {'TTFT':>7} {'vs full':>8} {'cached':>8} {'chunks hit':>11} "
             f"{'rows computed':>14}  answer"]
    for row in rows:
        hits = "-" if row.chunk_hits is None else f"{row.chunk_hits}/{row.chunks}"
        share = "100%" if row.recomputed_share is None else f"{row.recomputed_share:.0%}"
        speed = f"{full.ttft_s / row.ttft_s:.2f}x" if row.ttft_s else "-"
        lines.append(f"{row.mode:<20} {row.ttft_s:>6.2f}s {speed:>8} "
                     f"{row.cached_tokens:>8} {hits:>11} {share:>14}  {row.answer!r}")
    blend = rows[-1]
    if blend.blended is False:
        lines.append("CacheBlend did not blend this request (see meta_info.cacheblend.reason).")
    same = "yes" if blend.answer == full.answer else "no"
    lines += ["", f"CacheBlend's answer equals full prefill's: {same}",
              f"(prompt {full.prompt_tokens} tokens; TTFT measured on the client, one run: "
              "see docs/results for benchmarks)"]
    return "\n".join(lines)


EXAMPLE_TEXT = ("Passages: <|cacheblend_chunk|>Paris, the capital of France, lies on the Seine "
                "and has been the largest city of the country for centuries."
                "<|/cacheblend_chunk|> Where is Paris?")
"""The ``--keep-server`` curl example's prompt (one chunk above the server's minimum length)."""


def _usage(base_url: str) -> str:
    return f"""
The server keeps serving at {base_url} (Ctrl-C stops it). Try it:

  curl -s {base_url}/generate -H 'content-type: application/json' -d '{{
    "text": "{EXAMPLE_TEXT}",
    "sampling_params": {{"max_new_tokens": 16, "temperature": 0}}}}'

  from openai import OpenAI
  import sglang_cacheblend as cb
  client = OpenAI(base_url="{base_url}/v1", api_key="none")
  content = "Passages:\\n" + cb.chunk(passage_1) + cb.chunk(passage_2) + "\\nQuestion: ..."
  client.chat.completions.create(model="default", messages=[{{"role": "user", "content": content}}])
"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The ``demo`` flags; every other argument is a flag of the server it starts."""
    add = parser.add_argument
    add("--port", type=int, default=30123, help="port on 127.0.0.1")
    add("--passages", type=Path, default=None,
        help="passages: a JSON list of strings, a musique_dev-format file, or text with passages "
             "separated by blank lines (default: a bundled item)")
    add("--question", default=None, help="the question (default: the item's)")
    add("--model-path", type=Path, default=None,
        help="a Hugging Face model directory (default: the embedded SmolLM2)")
    add("--keep-server", action="store_true",
        help="leave the server serving afterwards and print how to call it")


def run_demo(model_path: Path, *, port: int, extra_args: list[str],
             passages_file: Path | None = None, question: str | None = None,
             keep_server: bool = False, log_path: Path | None = None) -> list[DemoRow]:
    """Start a ``--enable-cacheblend`` server on 127.0.0.1, compare, print, maybe keep serving."""
    from transformers import AutoTokenizer

    from sglang_cacheblend.launch import ServerProcess

    passages, question = load_passages(passages_file, question)
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    args = list(extra_args) if "--enable-cacheblend" in extra_args else [
        "--enable-cacheblend", *extra_args]
    print(f"starting SGLang with CacheBlend: {model_path} on 127.0.0.1:{port} (log: {log_path})",
          flush=True)
    server = ServerProcess(args=args, port=port, model_path=model_path, log_path=log_path,
                           progress=True)
    server.start()
    try:
        rows = compare(server.base_url, passages, question, tokenizer)
        print(render(rows, question), flush=True)
        if keep_server:
            print(_usage(server.base_url), flush=True)
            server.wait()
    finally:
        server.stop()
    return rows
