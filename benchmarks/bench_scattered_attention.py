"""Micro-benchmark: attention for scattered query rows vs dense causal attention (CPU).

One request of N tokens with SmolLM2-135M's attention shape (9 query heads, 3 KV heads,
head_dim 64). The recomputed rows are 15% of N: random scattered rows plus the last 100 rows (the
"question"). Compared, on the same keys/values:

* dense:    ``scaled_dot_product_attention`` over all N rows, 4-D, ``is_causal=True`` (GQA via
            ``enable_gqa``): what a full prefill layer pays;
* ours:     :class:`sglang_cacheblend.blend.ScatteredAttention` (exact causal mask by position),
            plan built once (timed apart: it is paid once per batch, not per layer);
* boolmask: stock SDPA for the 15% rows against all N keys with one dense boolean mask.

Timings are interleaved (dense, ours, boolmask, repeat) and the median is reported, because the
machines are shared and noisy. ``ideal`` is the arithmetic ratio ``(N (N + 1) / 2) / sum(p + 1)``
of key dots, i.e. the speedup of a perfect kernel.

    python benchmarks/bench_scattered_attention.py            # ~1-3 min on 2 cores
    python benchmarks/bench_scattered_attention.py --sizes 1000 3600 --reps 3
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from sglang_cacheblend.blend import ScatteredAttention

Q_HEADS, KV_HEADS, HEAD_DIM = 9, 3, 64
QUESTION_ROWS = 100
RATIO = 0.15
DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}


def make_case(n: int, dtype: torch.dtype, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    q_all = torch.randn(n, Q_HEADS, HEAD_DIM, generator=gen).to(dtype)
    k = torch.randn(n, KV_HEADS, HEAD_DIM, generator=gen).to(dtype)
    v = torch.randn(n, KV_HEADS, HEAD_DIM, generator=gen).to(dtype)
    num_rows = round(RATIO * n)
    scattered = torch.randperm(n - QUESTION_ROWS, generator=gen)[: num_rows - QUESTION_ROWS]
    rows = torch.cat([scattered.sort().values, torch.arange(n - QUESTION_ROWS, n)])
    return q_all, k, v, rows


def plan_for(
    rows: torch.Tensor, n: int, dtype: torch.dtype, block_rows: int
) -> ScatteredAttention:
    """The plan of one request of ``n`` keys whose query rows are ``rows``."""
    return ScatteredAttention(
        rows,
        torch.tensor([0, rows.numel()]),
        torch.tensor([0, n]),
        num_q_heads=Q_HEADS,
        num_kv_heads=KV_HEADS,
        head_dim=HEAD_DIM,
        dtype=dtype,
        block_rows=block_rows,
    )


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def bench_one(n: int, dtype: torch.dtype, reps: int, block_rows: int) -> dict:
    q_all, k, v, rows = make_case(n, dtype)
    q = q_all[rows].contiguous()
    q4, k4, v4 = (t.transpose(0, 1).unsqueeze(0) for t in (q_all, k, v))
    plan_s = timed(lambda: plan_for(rows, n, dtype, block_rows))
    plan = plan_for(rows, n, dtype, block_rows)
    bool_mask = torch.arange(n)[None, :] <= rows[:, None]
    q_rows4 = q.transpose(0, 1).unsqueeze(0)
    fns = {
        "dense": lambda: F.scaled_dot_product_attention(
            q4, k4, v4, is_causal=True, enable_gqa=True
        ),
        "ours": lambda: plan.run(q, k, v),
        "boolmask": lambda: F.scaled_dot_product_attention(
            q_rows4, k4, v4, attn_mask=bool_mask, enable_gqa=True
        ),
    }
    dense_out = fns["dense"]()[0].transpose(0, 1)[rows]
    ours_out = fns["ours"]()
    fns["boolmask"]()
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(reps):
        for name, fn in fns.items():
            times[name].append(timed(fn))
    med = {name: statistics.median(t) for name, t in times.items()}
    key_dots = float((rows + 1).sum())
    return {
        "N": n,
        "dtype": str(dtype).removeprefix("torch."),
        "rows": rows.numel(),
        "dense_ms": med["dense"] * 1e3,
        "scattered_ms": med["ours"] * 1e3,
        "boolmask_ms": med["boolmask"] * 1e3,
        "speedup": med["dense"] / med["ours"],
        "speedup_boolmask": med["dense"] / med["boolmask"],
        "ideal_speedup": n * (n + 1) / 2 / key_dots,
        "plan_ms": plan_s * 1e3,
        "min_dense_ms": min(times["dense"]) * 1e3,
        "min_scattered_ms": min(times["ours"]) * 1e3,
        "max_abs_err_vs_dense": float((ours_out.float() - dense_out.float()).abs().max()),
    }


def block_sweep(n: int, dtype: torch.dtype, reps: int, sizes: list[int]) -> list[dict]:
    q_all, k, v, rows = make_case(n, dtype, seed=1)
    q = q_all[rows].contiguous()
    plans = {b: plan_for(rows, n, dtype, b) for b in sizes}
    times: dict[int, list[float]] = {b: [] for b in sizes}
    for p in plans.values():
        p.run(q, k, v)
    for _ in range(reps):
        for b, p in plans.items():
            times[b].append(timed(lambda p=p: p.run(q, k, v)))
    return [
        {
            "N": n,
            "dtype": str(dtype).removeprefix("torch."),
            "block_rows": b,
            "scattered_ms": statistics.median(t) * 1e3,
        }
        for b, t in times.items()
    ]


def write_outputs(report: dict, out_dir: Path) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "attention_bench.json").write_text(json.dumps(report, indent=2) + "\n")
    machine = report["machine"]
    lines = [
        "# Scattered-row attention vs dense causal attention (CPU)",
        "",
        f"Command: `{report['command']}`  ",
        (
            f"Machine: {machine['cpu']}, {machine['cores']} cores, torch {machine['torch']}, "
            f"{machine['threads']} threads; load average before/after "
            f"{report['load_before']} / {report['load_after']}.  "
        ),
        (
            "Shape: 9 q heads, 3 kv heads, head_dim 64 (SmolLM2-135M), one request; 15% of rows ="
            " random scattered rows + the last 100 rows. Median of interleaved repetitions."
        ),
        "",
        (
            "| N | dtype | rows | dense causal ms | ours ms | speedup | bool-mask SDPA ms | "
            "bool-mask speedup | ideal | plan ms | max abs err |"
        ),
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in report["results"]:
        lines.append(
            f"| {r['N']} | {r['dtype']} | {r['rows']} | {r['dense_ms']:.1f} | "
            f"{r['scattered_ms']:.1f} | **{r['speedup']:.2f}x** | {r['boolmask_ms']:.1f} | "
            f"{r['speedup_boolmask']:.2f}x | {r['ideal_speedup']:.2f}x | {r['plan_ms']:.1f} | "
            f"{r['max_abs_err_vs_dense']:.1e} |"
        )
    if report["block_sweep"]:
        lines += [
            "",
            "Block size sweep (ours, ms, median):",
            "",
            "| N | dtype | block_rows | ms |",
            "|---|---|---|---|",
        ]
        for r in report["block_sweep"]:
            lines.append(
                f"| {r['N']} | {r['dtype']} | {r['block_rows']} | {r['scattered_ms']:.1f} |"
            )
    lines += [
        "",
        "Notes: `ideal` counts key dots only. Our blocks of ~80 rows also compute each block's",
        "keys between its first and last row for every row of the block (10-15% more key dots",
        "than ideal at 15% random rows), SDPA's CPU kernel is less efficient on short query",
        "blocks than on the dense prefill's 256-row tiles, and the additive mask costs ~5-10%. The",
        "machine is shared: a busy second core makes every small torch op wait for a scheduler",
        "tick, which hurts the blocked path more than one big dense call; rerun when idle.",
    ]
    (out_dir / "attention_bench.md").write_text("\n".join(lines) + "\n")
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for dtype, color in (("bfloat16", "tab:blue"), ("float32", "tab:orange")):
        rs = [r for r in report["results"] if r["dtype"] == dtype]
        if not rs:
            continue
        ns = [r["N"] for r in rs]
        ax.plot(ns, [r["speedup"] for r in rs], "o-", color=color, label=f"ours, {dtype}")
        ax.plot(
            ns,
            [r["speedup_boolmask"] for r in rs],
            "s--",
            color=color,
            alpha=0.6,
            label=f"SDPA + bool mask, {dtype}",
        )
    ideal = sorted({r["N"]: r["ideal_speedup"] for r in report["results"]}.items())
    ax.plot([n for n, _ in ideal], [x for _, x in ideal], "k:", label="ideal (key dots)")
    ax.axhline(1.0, color="grey", lw=0.8)
    ax.set_xlabel("prompt tokens N")
    ax.set_ylabel("speedup over dense causal SDPA")
    ax.set_title("Attention for 15% scattered query rows (2 CPU threads)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out_dir / "attention_bench.png", dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[1000, 2000, 3600, 8000])
    parser.add_argument("--dtypes", nargs="+", default=["bf16", "fp32"], choices=list(DTYPES))
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--block-rows", type=int, default=80)
    parser.add_argument(
        "--sweep",
        type=int,
        nargs="*",
        default=[48, 64, 80, 96, 128],
        help="block sizes to compare at N=3600 (empty: skip)",
    )
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=Path("docs/results"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    report = {
        "command": "python benchmarks/bench_scattered_attention.py " + " ".join(os.sys.argv[1:]),
        "machine": {
            "cpu": platform.processor() or platform.machine(),
            "cores": os.cpu_count(),
            "threads": torch.get_num_threads(),
            "torch": torch.__version__,
        },
        "load_before": [round(x, 2) for x in os.getloadavg()],
        "results": [],
        "block_sweep": [],
    }
    header = (
        f"{'N':>6} {'dtype':>9} {'rows':>5} {'dense ms':>9} {'ours ms':>8} {'speedup':>8} "
        f"{'boolmask':>9} {'bm spd':>7} {'ideal':>6} {'plan ms':>8} {'err':>8}"
    )
    print(header)
    for name in args.dtypes:
        for n in args.sizes:
            r = bench_one(n, DTYPES[name], args.reps, args.block_rows)
            report["results"].append(r)
            print(
                f"{n:>6} {r['dtype']:>9} {r['rows']:>5} {r['dense_ms']:>9.1f} "
                f"{r['scattered_ms']:>8.1f} {r['speedup']:>7.2f}x {r['boolmask_ms']:>9.1f} "
                f"{r['speedup_boolmask']:>6.2f}x {r['ideal_speedup']:>5.2f}x "
                f"{r['plan_ms']:>8.1f} {r['max_abs_err_vs_dense']:>8.1e}",
                flush=True,
            )
    if args.sweep:
        for name in args.dtypes:
            sweep = block_sweep(3600, DTYPES[name], args.reps, args.sweep)
            report["block_sweep"] += sweep
            print(
                "block sweep N=3600",
                name,
                ", ".join(f"{r['block_rows']}: {r['scattered_ms']:.1f} ms" for r in sweep),
            )
    report["load_after"] = [round(x, 2) for x in os.getloadavg()]
    write_outputs(report, args.out)
    print(f"wrote {args.out}/attention_bench.{{json,md,png}}")


if __name__ == "__main__":
    main()
