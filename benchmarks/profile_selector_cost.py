"""Why the question lookahead costs more time than V deviation at the same ratio (plain torch, CPU).

Both selectors recompute the same number of rows (the lookahead's suffix rows are counted in
its budget). The time differs for two reasons, which this script separates, per item and
selector, interleaved per repetition so both see the same machine:

* ``lookahead s``: the suffix run ahead through the later layers
  (:func:`sglang_cacheblend.blend.lookahead.suffix_lookahead`);
* ``attention s`` and ``attention work``: the scattered rows' exact-mask attention, and its
  ideal work ``sum over layers and recomputed rows of (position + 1)``, the keys a row at
  ``position`` attends to under a causal mask. A selector that picks rows later in the prompt
  pays more attention per row at the same row count.

Timing hooks wrap the two functions for the duration of a call only (this is a benchmark; the
product never patches them). Writes ``docs/results/selector_cost.{json,md}``. Usage::

    python benchmarks/profile_selector_cost.py --items 0 10 20 --reps 3
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import time
from collections import defaultdict
from collections.abc import Iterator
from pathlib import Path

import torch
from bench_blended_forward import DEFAULT_DATA, ROOT, add_dtype_argument, setup

from sglang_cacheblend.blend import forward
from sglang_cacheblend.blend.attention import ScatteredAttention
from sglang_cacheblend.blend.offline import run_blend
from sglang_cacheblend.config import BlendConfig

SELECTORS = ("v_deviation", "question_lookahead")


@contextlib.contextmanager
def timed_parts(totals: dict[str, float]) -> Iterator[None]:
    """Accumulate the lookahead's and the scattered attention's seconds and work in ``totals``."""
    lookahead, run, plan = forward.suffix_lookahead, ScatteredAttention.run, \
        ScatteredAttention.for_request.__func__
    work: dict[int, int] = {}
    inside = [False]  # the lookahead's own fused layers are its time, not the rows'

    def timed_lookahead(*args, **kwargs):
        started = time.perf_counter()
        inside[0] = True
        try:
            return lookahead(*args, **kwargs)
        finally:
            inside[0] = False
            totals["lookahead_s"] += time.perf_counter() - started

    def counted_plan(cls, q_positions, *args, **kwargs):
        attention = plan(cls, q_positions, *args, **kwargs)
        work[id(attention)] = int((q_positions.to(torch.int64) + 1).sum())
        return attention

    def timed_run(self, *args, **kwargs):
        if inside[0]:
            return run(self, *args, **kwargs)
        started = time.perf_counter()
        try:
            return run(self, *args, **kwargs)
        finally:
            totals["attention_s"] += time.perf_counter() - started
            totals["attention_work"] += work.get(id(self), 0)

    forward.suffix_lookahead = timed_lookahead
    ScatteredAttention.run = timed_run
    ScatteredAttention.for_request = classmethod(counted_plan)
    try:
        yield
    finally:
        forward.suffix_lookahead = lookahead
        ScatteredAttention.run = run
        ScatteredAttention.for_request = classmethod(plan)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA)
    parser.add_argument("--items", type=int, nargs="+", default=[0, 10, 20])
    parser.add_argument("--passages", type=int, default=6)
    parser.add_argument("--ratio", type=float, default=0.15)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    add_dtype_argument(parser)
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "results")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    rows = []
    for item in args.items:
        _, ops, prompt = setup(args.data, item, args.passages, getattr(torch, args.dtype))
        configs = {s: BlendConfig(recompute_ratio=args.ratio, selector=s) for s in SELECTORS}
        for config in configs.values():  # warm-up
            run_blend(ops, prompt, config)
        samples: dict[str, list[dict[str, float]]] = defaultdict(list)
        for _ in range(args.reps):
            for name, config in configs.items():
                totals: dict[str, float] = defaultdict(float)
                with timed_parts(totals):
                    started = time.perf_counter()
                    result = run_blend(ops, prompt, config)
                    totals["wall_s"] = time.perf_counter() - started
                totals["recomputed_rows"] = result.recomputed_rows
                samples[name].append(dict(totals))
        for name, runs in samples.items():
            row = {"item": item, "selector": name, "tokens": int(prompt.input_ids.numel())}
            for key in runs[0]:
                row[key] = statistics.median(r[key] for r in runs)
            rows.append(row)
        print(rows[-2:])
    payload = {"ratio": args.ratio, "passages": args.passages, "reps": args.reps,
               "threads": args.threads, "dtype": args.dtype, "load_avg": list(os.getloadavg()),
               "rows": rows}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "selector_cost.json").write_text(json.dumps(payload, indent=2))
    (args.out / "selector_cost.md").write_text(report(args, rows, payload["load_avg"]))
    print((args.out / "selector_cost.md").read_text())


def report(args: argparse.Namespace, rows: list[dict], load: list[float]) -> str:
    """Per item, the lookahead's extra time split into its own run and its rows' attention."""
    by = {(r["item"], r["selector"]): r for r in rows}
    lines = [
        f"# Why question_lookahead costs more than v_deviation at ratio {args.ratio:g}", "",
        f"Command: `python benchmarks/profile_selector_cost.py --items "
        f"{' '.join(map(str, args.items))} --passages {args.passages} --reps {args.reps} "
        f"--dtype {args.dtype}`  ",
        f"Plain torch blended prefill (`run_blend`), SmolLM2-135M {args.dtype}, {args.threads} "
        f"threads, medians of {args.reps} interleaved repetitions; load average {load}. "
        "Attention work: sum over layers and recomputed rows of (position + 1).", "",
        "| item | tokens | wall s V dev | wall s lookahead | extra | lookahead run s | extra "
        "attention s | attention work lookahead / V dev | rows lookahead / V dev |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for item in args.items:
        v, q = by[(item, "v_deviation")], by[(item, "question_lookahead")]
        lines.append(
            f"| {item} | {v['tokens']} | {v['wall_s']:.2f} | {q['wall_s']:.2f} | "
            f"{q['wall_s'] / v['wall_s'] - 1:+.0%} | {q['lookahead_s']:.2f} | "
            f"{q['attention_s'] - v['attention_s']:+.2f} | "
            f"{q['attention_work'] / v['attention_work']:.2f} | "
            f"{q['recomputed_rows'] / v['recomputed_rows']:.3f} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
