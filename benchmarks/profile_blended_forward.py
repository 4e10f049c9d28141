"""Where the time of a blended prefill goes, next to a dense prefill of the same prompt.

One ``torch.profiler`` run each of transformers' dense SDPA prefill and of
:func:`sglang_cacheblend.blend.forward.blended_prefill` at ``--ratio`` (same prompt and weights
as ``bench_blended_forward.py``), after a warm-up. Operators are grouped by their self CPU time:

- projections + MLP: ``linear``/``mm``/``addmm``/``matmul`` (QKV, output projection, MLP);
- attention kernel: SDPA and its internals (including softmax inside the math path);
- gather / scatter: indexing, ``index_put_``, ``cat``, ``copy_``, the price of computing
  scattered rows and writing their KV;
- selection: ``topk``/``sort`` and the per-row deviation norms;
- norms, activations, RoPE, other element-wise.

The chunk KV realignment (RoPE rotation of cached keys) happens before ``blended_prefill`` in
this offline path; on the server it is part of the request's forward
(``serving.layer_loader.ChunkSeeder``), so it is timed separately here and added as its own line.

Writes ``docs/results/blend_profile.{json,md}``. Usage::

    python benchmarks/profile_blended_forward.py --passages 6 --ratio 0.15
"""

from __future__ import annotations

import argparse
import json
import os
import time
from collections import defaultdict
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

from bench_blended_forward import DEFAULT_DATA, ROOT, add_dtype_argument, setup
from sglang_cacheblend.blend.offline import run_blend
from sglang_cacheblend.blend.realign import realign_keys
from sglang_cacheblend.config import BlendConfig

CATEGORIES: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("attention kernel", ("scaled_dot_product", "_flash_attention", "softmax", "baddbmm",
                          "bmm")),
    ("projections + MLP", ("linear", "addmm", "aten::mm", "matmul")),
    ("gather / scatter", ("index", "scatter", "gather", "aten::cat", "copy_", "masked",
                          "nonzero", "where")),
    ("selection", ("topk", "sort", "norm", "argsort")),
    ("norms, activations, RoPE, element-wise", ("rms", "silu", "mul", "add", "pow", "mean",
                                                 "rsqrt", "neg", "sin", "cos", "div", "sub",
                                                 "exp")),
)


def categorize(name: str) -> str:
    lowered = name.lower()
    for category, needles in CATEGORIES:
        if any(needle in lowered for needle in needles):
            return category
    return "other"


def profile_fn(fn) -> tuple[float, dict[str, float]]:
    """Wall time of one call and self CPU seconds per category."""
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        started = time.perf_counter()
        fn()
        wall = time.perf_counter() - started
    per_category: dict[str, float] = defaultdict(float)
    for event in prof.key_averages():
        per_category[categorize(event.key)] += event.self_cpu_time_total / 1e6
    return wall, dict(per_category)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA)
    parser.add_argument("--item", type=int, default=0)
    parser.add_argument("--passages", type=int, default=6)
    parser.add_argument("--ratio", type=float, default=0.15)
    parser.add_argument("--threads", type=int, default=2)
    add_dtype_argument(parser)
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "results")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model, ops, prompt = setup(args.data, args.item, args.passages,
                                getattr(torch, args.dtype))
    config = BlendConfig(recompute_ratio=args.ratio)

    def dense() -> None:
        with torch.no_grad():
            model(prompt.input_ids[None], use_cache=False, logits_to_keep=1)

    def blend() -> None:
        run_blend(ops, prompt, config)

    reused = prompt.reuse_mask.nonzero().squeeze(1)
    flat = prompt.cached_k[:, reused].reshape(-1, ops.num_kv_heads, ops.head_dim)
    positions = reused.repeat(ops.num_layers)

    def realign() -> None:  # what the server's ChunkSeeder does per request (delta 100 here)
        realign_keys(flat, positions, positions + 100, ops.rotary)

    for fn in (dense, blend, realign):  # warm-up
        fn()
    results = {name: profile_fn(fn) for name, fn in
               (("dense_sdpa", dense), (f"blend@{args.ratio:g}", blend),
                ("chunk_realignment", realign))}
    n = prompt.input_ids.numel()
    payload = {"tokens": n, "passages": args.passages, "ratio": args.ratio,
               "threads": args.threads, "dtype": args.dtype, "load_avg": list(os.getloadavg()),
               "modes": {k: {"wall_s": w, "self_cpu_s": c} for k, (w, c) in results.items()}}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "blend_profile.json").write_text(json.dumps(payload, indent=2))
    names = [c for c, _ in CATEGORIES] + ["other"]
    blend_name = f"blend@{args.ratio:g}"
    lines = [
        f"# Where the time goes: dense prefill vs blend@{args.ratio:g} (plain torch, CPU)", "",
        f"Command: `python benchmarks/profile_blended_forward.py --data {args.data} "
        f"--passages {args.passages} "
        f"--ratio {args.ratio} --dtype {args.dtype}`  ",
        f"Prompt: {n} tokens from `{args.data}` item {args.item}, SmolLM2-135M {args.dtype}, "
        f"{args.threads} threads, load average "
        f"{payload['load_avg']}. Self CPU seconds per operator group (torch.profiler); wall "
        "time of the profiled call in the last row.", "",
        "| operator group | dense SDPA | " + blend_name + " | realignment of all chunk keys |",
        "|---|---|---|---|",
    ]
    for name in names:
        cells = [results[m][1].get(name, 0.0) for m in ("dense_sdpa", blend_name,
                                                         "chunk_realignment")]
        lines.append(f"| {name} | " + " | ".join(f"{c:.3f}" for c in cells) + " |")
    lines.append("| **wall time** | " + " | ".join(
        f"**{results[m][0]:.3f}**" for m in ("dense_sdpa", blend_name, "chunk_realignment"))
        + " |")
    (args.out / "blend_profile.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
