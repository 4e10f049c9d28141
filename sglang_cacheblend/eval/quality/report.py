"""What ``sglang-cacheblend eval`` makes of its rows: the per-mode summary, the written report
(JSON, CSV, Markdown, plots) and the merge of runs over disjoint items.

The headline is the share of the reuse-to-full KL gap a mode recovers; the Markdown table adds
the paired, item-by-item comparison of the reference mode (the server's own selector at the
main ratio) with every other mode (:mod:`sglang_cacheblend.eval.paired`).
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from sglang_cacheblend.eval.metrics import gap_recovered, summarize
from sglang_cacheblend.eval.paired import paired_gap
from sglang_cacheblend.eval.plots import plot_gap_recovered, plot_paired_kl, plot_quality_vs_ratio
from sglang_cacheblend.eval.quality.modes import QualityConfig
from sglang_cacheblend.eval.results import load_results, write_results
from sglang_cacheblend.eval.teacher_forcing import FULL, REUSE


def summarize_modes(rows: list[dict[str, Any]]) -> dict[str, dict[str, float]]:
    """Mean of every metric per mode, plus the share of the reuse-to-full KL gap recovered.

    The gap of a mode is taken over the items that mode was scored on (runs merged from
    batches may score some modes on fewer items): ``1 - mean KL(mode) / mean KL(reuse)`` on
    those items. Time means skip rows without the figure (NaN).
    """
    summary: dict[str, dict[str, float]] = {}
    reuse_kl = {row["item"]: float(row["kl"]) for row in rows if row["mode"] == REUSE.name}
    for mode in dict.fromkeys(row["mode"] for row in rows):
        mine = [row for row in rows if row["mode"] == mode]
        summary[mode] = {
            key: summarize(float(row[key]) for row in mine).mean
            for key in ("kl", "logprob", "answer_matches_full", "f1_vs_full", "dataset_f1",
                        "recomputed_fraction")
        }
        for key in ("blend_time_s", "miss_time_s", "precompute_s"):
            times = [float(row.get(key, math.nan)) for row in mine]
            times = [t for t in times if not math.isnan(t)]
            summary[mode][key] = summarize(times).mean if times else math.nan
        summary[mode]["items"] = len(mine)
        base = [reuse_kl[row["item"]] for row in mine if row["item"] in reuse_kl]
        kl_reuse = math.fsum(base) / len(base) if len(base) == len(mine) else 0.0
        summary[mode]["gap_recovered"] = (gap_recovered(kl_reuse, summary[mode]["kl"])
                                          if kl_reuse > 0 else math.nan)
    return summary


def write_report(out: Path, config: QualityConfig, rows: list[dict[str, Any]],
                 summary: dict[str, dict[str, float]], command: str,
                 provenance_info: Mapping[str, Any] | None = None) -> None:
    """JSON + CSV (:mod:`sglang_cacheblend.eval.results`), a Markdown table with the paired
    comparison, and the plots (KL vs ratio, gap per mode, the default's KL item by item).

    ``provenance_info`` should be taken when the run *started* (the checkout may move while a
    run of hours goes on); None takes it now."""
    out.mkdir(parents=True, exist_ok=True)
    paths = write_results(out, "quality", config=_jsonable(config), rows=rows, summary=summary,
                          provenance_info=provenance_info)
    series = {"CacheBlend (server selector)": _sweep(summary, "")}
    if f"ctx {REUSE.name}" in summary:
        series["CacheBlend on context-conditioned chunk KV"] = _sweep(summary, "ctx ")
    plot_quality_vs_ratio(series,
                          out / "quality_kl_vs_ratio.png", full_prefill=0.0,
                          full_reuse=summary[REUSE.name]["kl"],
                          ylabel="mean KL to full prefill (16 teacher-forced positions)",
                          title="Fidelity vs recompute ratio")
    plot_gap_recovered({name: v["gap_recovered"] for name, v in summary.items()
                        if name not in (FULL.name, REUSE.name)}, out / "quality_gap.png")
    items = sorted({int(row["item"]) for row in rows})
    lines = [
        "# Quality and fidelity per mode",
        "",
        f"Command: `{command}`  ",
        f"Data: `{config.data}`, {len(items)} items ({_item_ranges(items)}), "
        f"{config.passages} passages per prompt; machine and commit in `{paths.json.name}`.",
        "",
        "| mode | items | mean KL to full | gap recovered | mean logprob | answer = full |"
        " F1 vs full | dataset F1 | recomputed rows | blend s | miss compute s |"
        " family precompute s |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, v in summary.items():
        lines.append(
            f"| {name} | {v['items']:.0f} | {v['kl']:.4f} | {v['gap_recovered']:.0%} | "
            f"{v['logprob']:.3f} | {v['answer_matches_full']:.0%} | {v['f1_vs_full']:.3f} | "
            f"{v['dataset_f1']:.3f} | {v['recomputed_fraction']:.1%} | "
            f"{_seconds(v['blend_time_s'])} | {_seconds(v['miss_time_s'])} | "
            f"{_seconds(v['precompute_s'])} |"
        )
    lines += ["", "Gap recovered: `1 - KL(mode) / KL(reuse)` over the items the mode was scored "
              "on, against reuse of standalone chunk KV. `ctx` modes reuse chunk KV computed "
              "after the server's chunk context. Times are the server's own per-request "
              "figures under whatever load the run had (not a benchmark): blend s is the "
              "blended prefill, miss compute s the chunks computed in the request's forward "
              "(first mode of each chunk variant per item), family precompute s the batched "
              "precompute of an item's chunks, each after its own context, in a context family "
              "(random / bm25: corpus passages outside the item; own: the prompt's other "
              "passages, an upper bound that no deployment has)."]
    lines += _paired_lines(rows, summary, config.main_ratio)
    figures = ["![KL vs ratio](quality_kl_vs_ratio.png)", "![gap](quality_gap.png)"]
    if _plot_paired(rows, summary, config.main_ratio, out / "quality_paired.png"):
        figures.append("![item by item](quality_paired.png)")
    lines += [line for figure in figures for line in ("", figure)] + [""]
    (out / "quality.md").write_text("\n".join(lines))


def reference_mode(summary: Mapping[str, Any], main_ratio: float) -> str | None:
    """The mode the others are compared with: the server's own selector at the main ratio, on
    context-conditioned chunk KV when the run has it (the server's default), else standalone."""
    for name in (f"ctx blend@{main_ratio:g}", f"blend@{main_ratio:g}"):
        if name in summary:
            return name
    return None


def _plot_paired(rows: list[dict[str, Any]], summary: dict[str, dict[str, float]],
                 main_ratio: float, path: Path) -> bool:
    """The reference mode's KL against reuse and the main ratio's other modes scored on all
    its items (at most four), item by item; False when there is nothing to draw."""
    ref = reference_mode(summary, main_ratio)
    if ref is None:
        return False
    kl = {(row["mode"], row["item"]): float(row["kl"]) for row in rows}
    items = [row["item"] for row in rows if row["mode"] == ref]
    others = [name for name in summary if name not in (ref, FULL.name)
              and all((name, i) in kl for i in items)
              and (name.endswith(f"@{main_ratio:g}") or name == REUSE.name)][:4]
    pairs = {name: [(kl[name, i], kl[ref, i]) for i in items] for name in others}
    if not pairs:
        return False
    try:
        plot_paired_kl(pairs, path, reference=ref)
    except ValueError:
        return False
    return True


def _paired_lines(rows: list[dict[str, Any]], summary: dict[str, dict[str, float]],
                  main_ratio: float) -> list[str]:
    """The reference mode against every other blended mode, item by item
    (:mod:`sglang_cacheblend.eval.paired`)."""
    ref = reference_mode(summary, main_ratio)
    others = [name for name in summary if name not in (ref, FULL.name, REUSE.name)]
    if ref is None or not others:
        return []
    lines = ["", f"Paired on the same items, `{ref}` against each mode: items where its KL is "
             "lower / higher, and its gap recovered minus the mode's with a 95% bootstrap "
             "interval over items (an interval that excludes 0 is a difference the items "
             "support).", "",
             "| against | items | lower KL | higher KL | gap difference (points) | 95% interval |",
             "|---|---|---|---|---|---|"]
    for name in others:
        try:
            pair = paired_gap(rows, ref, name)
        except ValueError:
            continue
        lines.append(f"| {name} | {pair.items} | {pair.wins} | {pair.losses} | "
                     f"{_points(pair.difference)} | [{_points(pair.low)}, {_points(pair.high)}] |")
    return lines


def _item_ranges(items: Sequence[int]) -> str:
    """``[0, 1, 2, 5]`` -> ``"0-2, 5"``."""
    ranges: list[list[int]] = []
    for item in items:
        if ranges and ranges[-1][1] == item - 1:
            ranges[-1][1] = item
        else:
            ranges.append([item, item])
    return ", ".join(f"{a}-{b}" if a != b else f"{a}" for a, b in ranges)


def _points(value: float) -> str:
    """A difference of two shares in percentage points: 0.213 -> ``+21``."""
    return "" if math.isnan(value) else f"{100 * value:+.0f}"


def _seconds(value: float) -> str:
    return "" if math.isnan(value) else f"{value:.2f}"


def _sweep(summary: dict[str, dict[str, float]], prefix: str) -> list[tuple[float, float]]:
    """(ratio, mean KL) of reuse and every ``blend@R`` mode whose name starts with ``prefix``."""
    points = [(0.0, summary[prefix + REUSE.name]["kl"])]
    pattern = re.compile(re.escape(prefix) + r"blend@([0-9.]+)")
    points += [(float(match[1]), values["kl"]) for name, values in summary.items()
               if (match := pattern.fullmatch(name))]
    return sorted(points)


def _jsonable(config: QualityConfig) -> dict[str, Any]:
    return {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(config).items()}


def merge_runs(dirs: Sequence[Path]) -> tuple[QualityConfig, list[dict[str, Any]],
                                              list[dict[str, Any]]]:
    """The rows of several runs' ``quality.json`` (their items must not overlap), the first
    run's config with the merged item count, and each run's provenance (with its folder)."""
    rows: list[dict[str, Any]] = []
    runs: list[dict[str, Any]] = []
    config = None
    seen: set[tuple[int, str]] = set()
    for folder in dirs:
        record = load_results(Path(folder) / "quality.json")
        for row in record.rows:
            key = (row["item"], row["mode"])
            if key in seen:
                raise ValueError(f"item {row['item']} mode {row['mode']!r} is in two runs")
            seen.add(key)
            rows.append(row)
        runs.append({"folder": str(folder), **record.provenance})
        if config is None:
            fields = QualityConfig.__dataclass_fields__
            values = {k: v for k, v in record.config.items() if k in fields}
            values = {k: tuple(v) if isinstance(v, list) else v for k, v in values.items()}
            config = QualityConfig(**{**values, "data": Path(values["data"])})
    items = sorted({row["item"] for row in rows})
    config = dataclasses.replace(config, start=items[0], items=len(items))
    return config, rows, runs
