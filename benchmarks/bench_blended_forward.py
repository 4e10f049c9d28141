"""Blended prefill vs dense prefill of the same weights, plain torch, one process, side by side.

The algorithm's own speed, without a server: SmolLM2-135M (the embedded model), a prompt of
instruction + k musique_dev passages (each chunk's KV precomputed standalone, realigned) +
question. Timed, interleaved per repetition:

* ``dense_sdpa``: transformers' forward of the whole prompt (4-D SDPA, causal), the fastest
  dense prefill of these weights we have on CPU;
* ``blend@r``: :func:`sglang_cacheblend.blend.forward.blended_prefill` at recompute ratio r
  (layers 0..1 on all rows, then the selected rows + question).

Writes ``docs/results/blended_forward_bench.{json,md}``. Usage::

    python benchmarks/bench_blended_forward.py --passages 6 --reps 3
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import subprocess
import time
from pathlib import Path

import torch

from sglang_cacheblend.blend.forward import full_prefill
from sglang_cacheblend.blend.hf_llama import HFLlamaOps
from sglang_cacheblend.blend.offline import blend_prompt, chunk_kv, run_blend
from sglang_cacheblend.config import BlendConfig
from sglang_cacheblend.launch import cpu_dtype, has_cuda
from sglang_cacheblend.embedded_model import ensure_model

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_DATA = ROOT.parent / "shared" / "data" / "cacheblend_inputs" / "musique_dev.json"


def add_dtype_argument(parser: argparse.ArgumentParser) -> None:
    """``--dtype``, by default the one ``sglang-cacheblend serve`` runs the model in here."""
    parser.add_argument("--dtype", choices=("float32", "bfloat16"),
                        default="bfloat16" if has_cuda() else cpu_dtype())


def setup(data: Path, item_index: int, passages: int, dtype: torch.dtype):
    """SmolLM2 (``dtype``, SDPA), its ``DecoderOps`` and the laid-out blended prompt of one item."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = ensure_model()
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype,
                                                 attn_implementation="sdpa").eval()
    ops = HFLlamaOps(model)
    item = json.loads(data.read_text())[item_index]

    def encode(text: str) -> torch.Tensor:
        return torch.tensor(tokenizer(text, add_special_tokens=False).input_ids)

    sink = encode("<|im_start|>system\n")
    prefix = encode("<|im_start|>system\nAnswer the question from the passages.<|im_end|>\n"
                    "<|im_start|>user\n")
    suffix = encode(f"Question: {item['question']}<|im_end|>\n<|im_start|>assistant\n")
    chunks = [chunk_kv(ops, sink, encode(c["text"] + "\n\n"), dtype)
              for c in item["ctxs"][: passages]]
    prefix_kv = full_prefill(ops, prefix, torch.arange(prefix.numel()), dtype)
    prompt = blend_prompt(ops, ops.rotary, prefix_kv, prefix, chunks, suffix, dtype)
    return model, ops, prompt


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA)
    parser.add_argument("--item", type=int, default=0)
    parser.add_argument("--passages", type=int, default=6)
    parser.add_argument("--ratios", type=float, nargs="+", default=[0.0, 0.15, 0.3])
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    add_dtype_argument(parser)
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "results")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    model, ops, prompt = setup(args.data, args.item, args.passages,
                                getattr(torch, args.dtype))
    n = prompt.input_ids.numel()

    def dense() -> None:
        with torch.no_grad():
            model(prompt.input_ids[None], use_cache=False, logits_to_keep=1)

    modes = {"dense_sdpa": dense}
    for ratio in args.ratios:
        config = BlendConfig(recompute_ratio=ratio)
        modes[f"blend@{ratio:g}"] = lambda c=config: run_blend(ops, prompt, c)
    times: dict[str, list[float]] = {name: [] for name in modes}
    for fn in modes.values():  # warm-up
        fn()
    for _ in range(args.reps):
        for name, fn in modes.items():
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)

    dense_median = statistics.median(times["dense_sdpa"])
    rows = []
    for name, values in times.items():
        median = statistics.median(values)
        rows.append({"mode": name, "min_s": min(values), "median_s": median,
                     "max_s": max(values), "speedup_vs_dense": dense_median / median})
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT,
                            capture_output=True, text=True).stdout.strip()
    meta = {"tokens": n, "passages": args.passages, "item": args.item, "reps": args.reps,
            "threads": args.threads, "dtype": args.dtype, "torch": torch.__version__,
            "machine": f"{platform.machine()}, {torch.get_num_threads()} threads",
            "load_avg": list(__import__("os").getloadavg()), "commit": commit}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "blended_forward_bench.json").write_text(
        json.dumps({"meta": meta, "rows": rows}, indent=2))
    lines = [
        "# Blended prefill vs dense prefill (plain torch, SmolLM2-135M, CPU)", "",
        f"Command: `python benchmarks/bench_blended_forward.py --data {args.data} "
        f"--passages {args.passages} "
        f"--reps {args.reps} --dtype {args.dtype}`  ",
        f"Prompt: {n} tokens (instruction + {args.passages} passages of item {args.item} of "
        f"`{args.data}` + question); {args.dtype}; {args.threads} threads; commit {commit}; "
        f"load average "
        f"{meta['load_avg']}.", "",
        "| mode | min s | median s | max s | speedup vs dense (median) |", "|---|---|---|---|---|",
    ]
    lines += [f"| {r['mode']} | {r['min_s']:.2f} | {r['median_s']:.2f} | {r['max_s']:.2f} | "
              f"{r['speedup_vs_dense']:.2f}x |" for r in rows]
    (args.out / "blended_forward_bench.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
