"""Offline selector sweep: which tokens to recompute, measured against full prefill, no server.

For each musique item the prompt is the shared RAG prompt (:mod:`sglang_cacheblend.dataset`:
instruction prefix, ``P`` passages as chunks, question suffix). Once per item: every chunk's KV
standalone after the attention sink (as the server precomputes it), the full prefill, and its greedy
continuation (``--tokens`` tokens, stopped at end of turn). Then for every mode (selector x budget,
gradual and layer-0 variants, plain reuse) one blended prefill of the prompt alone, and:

* ``kl``: mean KL(full || mode) over the continuation's positions, teacher-forced on the KV the
  prompt alone produced (:func:`sglang_cacheblend.blend.forward.extend`); the continuation is never
  part of the prompt, so a selector reading the question's queries sees what it sees at generation
  time;
* ``match``: 1 when the mode's own greedy continuation equals the full prefill's;
* ``f1``: token F1 (SQuAD normalisation) of the mode's answer against the full prefill's answer;
* ``recomputed``: rows computed summed over layers / rows of a full prefill (honest cost);
* ``time_s``: wall time of the blended forward (noisy machines: compare within one run).

The per-item preparation and the per-mode numbers are :mod:`.fidelity`'s (shared with
:mod:`.selection_ceiling`); this module holds the grid of modes, the summary, the report and the
command line.

The headline is the gap recovered, ``(KL_reuse - KL_mode) / KL_reuse`` on mean KLs, where reuse is
ratio 0 with the selection at layer 1 (layers 0-1 on all rows, then only the question). Results
are written after every item; ``--resume`` keeps the (item, mode) results of an earlier call with
the same settings and runs the rest, so ``--max-seconds`` can bound each call on a busy machine.

Usage (what produced ``docs/results/selector_sweep.*``: 51 modes, about 5 minutes per item on
a busy 2-core CPU)::

    python -m sglang_cacheblend.eval.offline.selector_sweep --items 10 --passages 4 \\
        --budgets 0.05 0.15 0.3 0.5 --threads 1 --out docs/results/selector_sweep
"""

from __future__ import annotations

import argparse
import json
import shlex
import statistics
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from sglang_cacheblend.config import SELECTOR_NAMES, BlendConfig
from sglang_cacheblend.eval.offline.fidelity import evaluate_blend, load_offline_model, prepare_item

REUSE_MODE = "reuse"
DEFAULT_SELECTORS = ("v_deviation", "k_deviation", "question_attention",
                     "attention_x_v_deviation", "attention_plus_k_deviation",
                     "question_output_error", "question_attention_cached",
                     "question_lookahead")
DEFAULT_BUDGETS = (0.05, 0.1, 0.15, 0.2, 0.3, 0.5)


@dataclass(frozen=True)
class Mode:
    """One way to prefill: a name, the selector, the target ratio and the whole config."""

    name: str
    selector: str
    ratio: float
    variant: str  # "single@<check layer>", "gradual@<check layer>" or "reuse"
    config: BlendConfig


def build_modes(selectors: Sequence[str], budgets: Sequence[float],
                singles: Sequence[tuple[int, float]], gradual: Sequence[tuple[float, float, int]],
                gradual_checks: Sequence[int]) -> list[Mode]:
    """The grid, the same for every selector: single check at layer 1 for every budget; single
    checks ``(layer, ratio)`` elsewhere; gradual ``(start, end, end_layer)`` schedules from each
    of ``gradual_checks``. First the reuse baselines (ratio 0 checked at layer 1 and at 0)."""
    modes = [Mode(REUSE_MODE, "v_deviation", 0.0, "reuse", BlendConfig(recompute_ratio=0.0)),
             Mode("reuse@L0", "v_deviation", 0.0, "reuse",
                  BlendConfig(recompute_ratio=0.0, check_layer=0))]
    for sel in selectors:
        for ratio in budgets:
            modes.append(Mode(f"{sel} {ratio:g}", sel, ratio, "single@1",
                              BlendConfig(recompute_ratio=ratio, check_layer=1, selector=sel)))
        for layer, ratio in singles:
            modes.append(Mode(f"{sel} {ratio:g} @L{layer}", sel, ratio, f"single@{layer}",
                              BlendConfig(recompute_ratio=ratio, check_layer=layer, selector=sel)))
        for start, end, end_layer in gradual:
            for check in gradual_checks:
                modes.append(Mode(
                    f"{sel} {start:g}->{end:g} by L{end_layer} from L{check}", sel, end,
                    f"gradual@{check}",
                    BlendConfig.linear(start, end, check, end_layer, selector=sel)))
    return modes


def summarize(rows: Sequence[dict[str, Any]], modes: Sequence[Mode]) -> list[dict[str, Any]]:
    """Per mode means over items, and gap recovered against the reuse mode's mean KL on the
    same items."""
    by_mode: dict[str, list[dict[str, Any]]] = {}
    for row in rows:
        by_mode.setdefault(row["mode"], []).append(row)
    reuse = {r["item"]: r["kl"] for r in by_mode.get(REUSE_MODE, [])}
    table = []
    for mode in modes:
        got = by_mode.get(mode.name)
        if not got:
            continue
        kl = statistics.fmean(r["kl"] for r in got)
        # the reuse KL of the same items, so a partial run still compares like with like
        reuse_kl = statistics.fmean(reuse.get(r["item"], float("nan")) for r in got)
        table.append({
            "mode": mode.name, "selector": mode.selector, "ratio": mode.ratio,
            "variant": mode.variant, "items": len(got), "kl": kl,
            "kl_se": statistics.stdev(r["kl"] for r in got) / len(got) ** 0.5
            if len(got) > 1 else 0.0,
            "gap_recovered": (reuse_kl - kl) / reuse_kl if reuse_kl > 0 else float("nan"),
            "kl_first": statistics.fmean(r["kl_first"] for r in got),
            "match": statistics.fmean(r["match"] for r in got),
            "f1": statistics.fmean(r["f1"] for r in got),
            "f1_dataset": statistics.fmean(r.get("f1_dataset", float("nan")) for r in got),
            "recomputed": statistics.fmean(r["recomputed"] for r in got),
            "time_s": statistics.median(r["time_s"] for r in got),
            "time_vs_full": statistics.median(r["time_s"] / r["full_time_s"] for r in got),
        })
    return table


def add_paired_wins(table: list[dict[str, Any]], rows: Sequence[dict[str, Any]],
                    modes: Sequence[Mode], baseline: str = "v_deviation") -> None:
    """``wins_vs_baseline``: share of items where a mode's KL is below that of the ``baseline``
    selector checked once at layer 1 with the same target ratio (the paper's rule at the same
    budget; a paired view of the same numbers, which mean KL hides)."""
    kl = {(r["mode"], r["item"]): r["kl"] for r in rows}
    ref = {m.ratio: m.name for m in modes if m.selector == baseline and m.variant == "single@1"}
    by_name = {m.name: m for m in modes}
    for entry in table:
        mode = by_name[entry["mode"]]
        other = None if mode.variant == "reuse" else ref.get(mode.ratio)
        pairs = [(kl[(mode.name, i)], kl[(other, i)]) for (name, i) in kl
                 if name == mode.name and other is not None and (other, i) in kl]
        entry["wins_vs_baseline"] = (
            sum(a < b for a, b in pairs) / len(pairs) if pairs and other != mode.name else None)


def markdown(table: Sequence[dict[str, Any]], config: dict[str, Any], info: dict[str, Any]) -> str:
    """The results table as Markdown, with the command and what the columns mean."""
    def pct(x: float | None) -> str:
        return "-" if x is None else f"{100 * x:.0f}%"

    lines = [
        "# Selector sweep: which tokens to recompute (offline, SmolLM2-135M, CPU)", "",
        (f"Command: `{config['command']}` (on a busy machine, repeat it with `--resume "
         "--max-seconds 480` until every item is done; only the timings depend on the split)  "),
        (f"Items {config['start']}..{config['start'] + config['items'] - 1} of "
        f"`{config['data_name']}`, {config['passages']} passages each (prompt "
        f"{info['prompt_len_min']}-{info['prompt_len_max']} tokens), {config['dtype']}, "
        f"{config['threads']} threads; commit {info['commit']}"
        f"{' (dirty tree)' if info['dirty'] else ''}; {info['date']}."), "",
        ("KL: mean KL(full || mode) over the first <= "
        f"{config['tokens']} positions of the full prefill's greedy continuation, teacher-forced "
        "on the KV the prompt alone produced (the continuation is never in the selector's view). "
        "Gap: (KL_reuse - KL_mode) / KL_reuse on mean KLs, reuse = ratio 0 selected at layer 1. "
        "Match: share of items whose greedy continuation equals full prefill's. F1: answer token "
        "F1 against full prefill's answer; dataset F1 against the item's gold answers (full "
        "prefill's own is f1_dataset_full in the JSON rows). Recomputed: rows computed summed "
        "over layers (suffix lookaheads included) / full prefill's. Time: median wall time of "
        "the blended forward (and its ratio to the full prefill in the same loop); machine load "
        f"avg {info['load_avg']}, so compare within this run only. Wins: share of items whose KL "
        "is below that of v_deviation checked once at layer "
        "1 with the same target ratio (the paper's rule at the same budget). ± is the standard "
        "error of the mean over items."), "",
        _default_line(), "",
        *_best_lines(table), "",
        ("| mode | KL | gap recovered | match | F1 vs full | dataset F1 | recomputed "
         "| time s (x full) | wins |"),
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for row in table:
        lines.append(
            f"| {row['mode']} | {row['kl']:.4f} ± {row['kl_se']:.4f} | "
            f"{pct(row['gap_recovered'])} | "
            f"{pct(row['match'])} | {row['f1']:.2f} | {row['f1_dataset']:.2f} | "
            f"{row['recomputed']:.3f} | "
            f"{row['time_s']:.2f} ({row['time_vs_full']:.2f}) | "
            f"{pct(row.get('wins_vs_baseline'))} |")
    return "\n".join(lines) + "\n"


def _default_line() -> str:
    """What ``BlendConfig()`` does today, so the table can be read against the default."""
    cfg = BlendConfig()
    schedule = f"gradual {cfg.gradual}" if cfg.gradual else "one selection"
    return (f"Default (`BlendConfig()`): selector `{cfg.selector}`, check layer {cfg.check_layer}, "
            f"{schedule}, ratio {cfg.recompute_ratio:g}.")


def _best_lines(table: Sequence[dict[str, Any]], ratio: float = 0.15,
                top: int = 6) -> list[str]:
    """A short ranking of the modes whose target ratio is ``ratio``, best gap first."""
    ranked = sorted((r for r in table if r["ratio"] == ratio), key=lambda r: -r["gap_recovered"])
    lines = [f"Best at a {ratio:g} target ratio (gap recovered, recomputed fraction):", ""]
    lines += [f"{i + 1}. {r['mode']}: {100 * r['gap_recovered']:.0f}%, {r['recomputed']:.3f}"
              for i, r in enumerate(ranked[:top])]
    return lines


def plot(table: Sequence[dict[str, Any]], out_path: Path) -> None:
    """Gap recovered vs budget (left) and vs recomputed fraction (right), one line per selector;
    gradual and layer-0 variants as separate markers."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(16, 5.5))
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, 2)
    variants = sorted({r["variant"] for r in table if r["variant"] != "reuse"},
                      key=lambda v: (v != "single@1", v))
    shapes = iter("sDPX*^v<>")
    markers = {v: "o-" if v == "single@1" else next(shapes, "x") for v in variants}
    selectors = sorted({r["selector"] for r in table if r["variant"] != "reuse"})
    colors = {s: f"C{i}" for i, s in enumerate(selectors)}
    for ax, x_key, x_label in ((axes[0], "ratio", "target recompute ratio (budget)"),
                               (axes[1], "recomputed", "rows recomputed / full prefill rows")):
        for sel in selectors:
            for variant, style in markers.items():
                pts = sorted((r[x_key], 100 * r["gap_recovered"]) for r in table
                             if r["selector"] == sel and r["variant"] == variant)
                if pts:
                    label = sel if variant == "single@1" else f"{sel} ({variant})"
                    ax.plot(*zip(*pts), style, color=colors[sel], label=label,
                            fillstyle="none" if variant.endswith("@0") else "full")
        ax.axhline(0, color="tab:red", linestyle=":", linewidth=1)
        ax.axhline(100, color="tab:green", linestyle="--", linewidth=1)
        ax.set_xlabel(x_label)
        ax.set_ylabel("KL gap recovered vs reuse (%)")
        ax.grid(alpha=0.3)
    axes[1].legend(fontsize=6, loc="upper left", bbox_to_anchor=(1.02, 1.0))
    fig.suptitle("Which tokens to recompute: share of the reuse-to-full KL gap recovered")
    fig.tight_layout()
    fig.savefig(out_path, dpi=120)


def _parse_gradual(text: str) -> tuple[float, float, int]:
    start, end, layer = text.split(":")
    return float(start), float(end), int(layer)


def _parse_single(text: str) -> tuple[int, float]:
    layer, ratio = text.split(":")
    return int(layer), float(ratio)


def _parser() -> argparse.ArgumentParser:
    from sglang_cacheblend.dataset import DEFAULT_DATA_PATH

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA_PATH)
    parser.add_argument("--items", type=int, default=10)
    parser.add_argument("--start", type=int, default=0, help="first item index")
    parser.add_argument("--passages", type=int, default=6)
    parser.add_argument("--tokens", type=int, default=16, help="continuation length")
    parser.add_argument("--selectors", nargs="+", default=list(DEFAULT_SELECTORS))
    parser.add_argument("--budgets", type=float, nargs="+", default=list(DEFAULT_BUDGETS))
    parser.add_argument("--single", type=_parse_single, nargs="*", default=[(0, 0.15)],
                        metavar="LAYER:RATIO", help="single checks at layers other than 1")
    parser.add_argument("--gradual", type=_parse_gradual, nargs="*", default=[(0.3, 0.15, 8)],
                        metavar="START:END:END_LAYER")
    parser.add_argument("--gradual-checks", type=int, nargs="+", default=[1, 0],
                        help="check layers each gradual schedule starts from")
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    parser.add_argument("--threads", type=int, default=2,
                        help="torch threads (1 is faster when other work shares the cores)")
    parser.add_argument("--out", type=Path, default=Path("docs/results/selector_sweep"),
                        help="path stem: writes <out>.json, <out>.md, <out>.png")
    parser.add_argument("--resume", action="store_true",
                        help="keep the (item, mode) results in <out>.json whose settings and mode "
                             "config are unchanged, run only the rest")
    parser.add_argument("--max-seconds", type=float, default=None,
                        help="stop after the mode running at this time (--resume continues)")
    return parser


def main(argv: Sequence[str] | None = None) -> None:
    from tqdm import tqdm

    from sglang_cacheblend.dataset import load_items
    from sglang_cacheblend.eval.results import provenance

    args = _parser().parse_args(argv)
    unknown = set(args.selectors) - set(SELECTOR_NAMES)
    if unknown:
        raise SystemExit(f"unknown selectors {sorted(unknown)}; known: {sorted(SELECTOR_NAMES)}")
    torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)
    modes = build_modes(args.selectors, args.budgets, args.single, args.gradual,
                        args.gradual_checks)
    config = {
        "data_name": args.data.name, "items": args.items, "start": args.start,
        "passages": args.passages, "tokens": args.tokens, "dtype": args.dtype,
        "threads": args.threads, "modes": [asdict(m) | {"config": asdict(m.config)} for m in modes],
    }
    json_path = args.out.with_suffix(".json")
    rows = _resumable_rows(json_path, config) if args.resume and json_path.exists() else []
    config["command"] = _command(sys.argv[1:] if argv is None else argv)

    ops, encode, decode, stop_ids, sink = load_offline_model(dtype)
    items = load_items(args.data)[args.start: args.start + args.items]
    done = {(r["item"], r["mode"]) for r in rows}
    resumed = len(rows)
    started = time.perf_counter()

    def out_of_time() -> bool:
        return args.max_seconds is not None and time.perf_counter() - started > args.max_seconds

    for item in tqdm(items, desc="items"):
        todo = [m for m in modes if (item.index, m.name) not in done]
        if not todo:
            continue
        if out_of_time():
            break
        with torch.no_grad():
            ctx = prepare_item(ops, encode, item, args.passages, args.tokens, sink, stop_ids,
                               dtype)
            for mode in tqdm(todo, desc=f"item {item.index}", leave=False):
                rows.append(evaluate_blend(ops, ctx, mode.name, mode.config, decode, stop_ids))
                if out_of_time():
                    break
        write_outputs(args.out, config, rows, modes, provenance())
    if rows and len(rows) == resumed:  # nothing new: re-render, keeping the run's provenance
        old_prov = json.loads(json_path.read_text())["provenance"]
        write_outputs(args.out, config, rows, modes, old_prov)


def _resumable_rows(json_path: Path, config: dict[str, Any]) -> list[dict[str, Any]]:
    """Rows of an earlier run worth keeping: same settings, and a mode whose name and config are
    still in the grid (a changed or dropped mode is run again or left out)."""
    old = json.loads(json_path.read_text())
    settings = ("data_name", "start", "passages", "tokens", "dtype", "threads")
    if any(old["config"].get(key) != config[key] for key in settings):
        raise SystemExit(f"{json_path} was written with other settings; drop --resume")
    wanted = json.loads(json.dumps(config["modes"]))
    same = {m["name"] for m in old["config"]["modes"] if m in wanted}
    last = config["start"] + config["items"]
    return [r for r in old["rows"] if r["mode"] in same and config["start"] <= r["item"] < last]


def _command(argv: Sequence[str]) -> str:
    """The command line as typed, less the flags that only split a run into calls."""
    kept, skip = [], False
    for arg in argv:
        if skip or arg == "--resume":
            skip = False
            continue
        if arg == "--max-seconds":
            skip = True
            continue
        kept.append(arg)
    return "python -m sglang_cacheblend.eval.offline.selector_sweep " + shlex.join(kept)


def write_outputs(out: Path, config: dict[str, Any], rows: list[dict[str, Any]],
                  modes: Sequence[Mode], prov: dict[str, Any]) -> None:
    """``<out>.json`` (config, provenance, summary, per-item rows), ``<out>.md``, ``<out>.png``."""
    out.parent.mkdir(parents=True, exist_ok=True)
    table = summarize(rows, modes)
    add_paired_wins(table, rows, modes)
    record = {"config": config, "provenance": prov, "summary": table, "rows": rows}
    out.with_suffix(".json").write_text(json.dumps(record, indent=1) + "\n")
    lens = [r["prompt_len"] for r in rows]
    info = {"commit": (prov["git"]["commit"] or "?")[:7], "dirty": prov["git"]["dirty"],
            "date": prov["date"], "load_avg": [round(x, 1) for x in prov["machine"]["load_avg"]],
            "prompt_len_min": min(lens), "prompt_len_max": max(lens)}
    config = dict(config, items=len({r["item"] for r in rows}))
    out.with_suffix(".md").write_text(markdown(table, config, info))
    plot(table, out.with_suffix(".png"))


if __name__ == "__main__":
    main()
