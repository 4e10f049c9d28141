"""TTFT through a real SGLang server: full prefill, prefix cache, and CacheBlend, one run.

One server (``--enable-cacheblend``, embedded SmolLM2, CPU defaults) serves every mode, so the
ratios compare like with like. A request is the benchmark prompt (instruction + k musique_dev
passages + question) with ``max_new_tokens=1``; its latency is the time to first token. Modes,
interleaved per repetition, each on a fresh ``cache_salt`` so no mode warms another's cache:

* ``full``: SGLang's normal prefill, nothing cached;
* ``prefix_same``: the exact same prompt again (SGLang's prefix cache holds all of it);
* ``prefix_reordered``: the same passages in reverse order (the prefix cache holds only the
  instruction), what prefix caching gives a RAG prompt with reordered retrieval;
* ``blend@r``: the reversed prompt with its chunks precomputed, blended at ratio r with the
  server's default selector; ``blend@r <rule>`` the same with each ``--selectors`` rule;
* ``dense_sdpa``: no server: transformers' forward of the reversed prompt in this process (4-D
  causal SDPA, the server's dtype and thread count), the fastest dense prefill of these weights
  on CPU; TTFT of a server can only be slower.

Writes ``docs/results/server_ttft.{json,md}``. Usage::

    python benchmarks/bench_server_ttft.py --passages 6 --reps 2 [--selectors v_deviation]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import time
import uuid
from pathlib import Path
from typing import Any

import sglang_cacheblend as cb
from sglang_cacheblend.chunks import ChunkedPrompt
from sglang_cacheblend.eval.bench_report import ratios_against
from sglang_cacheblend.eval.dataset import (
    DEFAULT_DATA_PATH,
    QAItem,
    build_prompt,
    encoder,
    load_items,
    tokenize_prompt,
)
from sglang_cacheblend.eval.load import Client
from sglang_cacheblend.eval.metrics import summarize
from sglang_cacheblend.launch import ServerProcess, cpu_dtype, has_cuda
from sglang_cacheblend.embedded_model import ensure_model

ROOT = Path(__file__).resolve().parent.parent


def build(tokenizer: Any, item: QAItem, passages: int) -> tuple[ChunkedPrompt, ChunkedPrompt,
                                                                list[str]]:
    """The shared RAG prompt (``eval.dataset``) tokenized in file order and with its passages
    reversed (what defeats the prefix cache), and its chunk texts in file order (to precompute).
    """
    prompt = build_prompt(item, num_passages=passages)
    reverse = prompt.reordered(range(passages - 1, -1, -1))
    encode = encoder(tokenizer)
    return tokenize_prompt(prompt, encode), tokenize_prompt(reverse, encode), list(prompt.passages)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA_PATH)
    parser.add_argument("--item", type=int, default=0)
    parser.add_argument("--passages", type=int, default=6)
    parser.add_argument("--ratios", type=float, nargs="+", default=[0.15])
    parser.add_argument("--reps", type=int, default=2)
    parser.add_argument("--selectors", nargs="*", default=[],
                        help="also time blend@ratio with these rules (per request)")
    parser.add_argument("--port", type=int, default=30931)
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "results")
    args = parser.parse_args()

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model_path = ensure_model()
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    dtype = "bfloat16" if has_cuda() else cpu_dtype()  # what `serve` runs the model in
    torch.set_num_threads(os.cpu_count() or 1)
    dense = AutoModelForCausalLM.from_pretrained(model_path, dtype=getattr(torch, dtype),
                                                 attn_implementation="sdpa").eval()
    item = load_items(args.data)[args.item]
    ordered, reverse, texts = build(tokenizer, item, args.passages)
    tokens = len(ordered.input_ids)
    times: dict[str, list[float]] = {"full": [], "prefix_same": [], "prefix_reordered": [],
                                     "dense_sdpa": []}
    blends = [(r, None) for r in args.ratios] + [(r, s) for r in args.ratios
                                                 for s in args.selectors]

    def blend_mode(ratio: float, selector: str | None) -> str:
        return f"blend@{ratio:g}" + (f" {selector}" if selector else "")

    times.update({blend_mode(r, s): [] for r, s in blends})
    log = Path("/tmp/bench_server_ttft.log")
    with ServerProcess(args=["--enable-cacheblend"], port=args.port, model_path=model_path,
                       log_path=log) as server:
        client = Client(server.base_url)

        def ttft(prompt: ChunkedPrompt, salt: str, ratio: float | None = None,
                 selector: str | None = None) -> float:
            return client.generate(prompt, salt, ratio, selector).latency_s

        def dense_prefill(prompt: ChunkedPrompt) -> float:
            start = time.perf_counter()
            with torch.inference_mode():
                dense(torch.tensor([prompt.input_ids]), logits_to_keep=1)
            return time.perf_counter() - start

        ttft(ordered, uuid.uuid4().hex)  # warm-up
        for _ in range(args.reps):
            salt = uuid.uuid4().hex
            times["full"].append(ttft(ordered, salt))  # also warms the tree for the next two
            times["prefix_same"].append(ttft(ordered, salt))
            times["prefix_reordered"].append(ttft(reverse, salt))
            for ratio, selector in blends:
                salt = uuid.uuid4().hex
                cb.precompute_chunks(client.url, texts, cache_salt=salt)
                times[blend_mode(ratio, selector)].append(ttft(reverse, salt, ratio, selector))
            times["dense_sdpa"].append(dense_prefill(reverse))

    stats = {mode: summarize(v) for mode, v in times.items()}
    ratios = ratios_against({m: s.median for m, s in stats.items()},
                            ("full", "prefix_reordered", "dense_sdpa"),
                            higher_is_better=False)
    rows = [{"mode": m, "min_s": s.min, "median_s": s.median, "max_s": s.max, **ratios[m]}
            for m, s in stats.items()]
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT,
                            capture_output=True, text=True).stdout.strip()
    meta = {"tokens": tokens, "passages": args.passages, "item": args.item, "reps": args.reps,
            "commit": commit, "load_avg": list(os.getloadavg()),
            "machine": "2-core x86_64 CPU, no GPU", "model": f"SmolLM2-135M-Instruct {dtype}"}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "server_ttft.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))
    lines = [
        "# TTFT through SGLang: full prefill, prefix cache, CacheBlend (CPU)", "",
        f"Command: `python benchmarks/bench_server_ttft.py --data {args.data} "
        f"--passages {args.passages} "
        f"--reps {args.reps}" + (f" --selectors {' '.join(args.selectors)}" if args.selectors
                                 else "") + "`  ",
        f"Prompt: {tokens} tokens (instruction + {args.passages} passages of item {args.item} of "
        f"`{args.data}` + question); SmolLM2-135M {dtype}; one server; commit {commit}; "
        f"load average "
        f"{meta['load_avg']}.", "",
        "| mode | min s | median s | max s | speedup vs full | vs prefix cache, reordered | "
        "vs dense SDPA |",
        "|---|---|---|---|---|---|---|",
    ]
    lines += [f"| {r['mode']} | {r['min_s']:.2f} | {r['median_s']:.2f} | {r['max_s']:.2f} | "
              f"{r['vs_full']:.2f}x | {r['vs_prefix_reordered']:.2f}x | {r['vs_dense_sdpa']:.2f}x |"
              for r in rows]
    (args.out / "server_ttft.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
