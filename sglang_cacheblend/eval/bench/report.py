"""What ``sglang-cacheblend bench`` makes of its rows: summaries, ratios and the written report.

Seconds measured on a shared, noisy machine do not compare across runs; ratios against the
baselines measured in the same run do. So every summary row carries ``vs_<baseline>`` ratios
(>1 is better) next to its times, and the Markdown report leads with them. Pure functions of the
per-request rows (:mod:`sglang_cacheblend.eval.bench.run` writes their fields), apart from
:func:`write_outputs`, which writes the files.
"""

from __future__ import annotations

import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from sglang_cacheblend.eval.bench.workload import shape_label
from sglang_cacheblend.eval.metrics import summarize

BASELINES = ("full", "prefix", "prefix_reordered")
"""The modes every other mode is compared with: no cache, the prefix cache in the warmed order,
and the prefix cache with the passages reordered."""

DENSE = "dense_sdpa"
"""The in-process dense prefill (``--dense-sdpa``): a TTFT baseline when measured, never under
load."""

TTFT_BASELINES = (*BASELINES, DENSE)


def ratios_against(
    values: Mapping[str, float], baselines: Sequence[str], *, higher_is_better: bool
) -> dict[str, dict[str, float | None]]:
    """Per mode, how many times better than each baseline (``vs_<baseline>``; >1 is better).

    TTFT (lower is better): ``baseline / mode``; throughput: ``mode / baseline``. None where a
    baseline was not measured or a value is 0.
    """
    out: dict[str, dict[str, float | None]] = {}
    for mode, value in values.items():
        row: dict[str, float | None] = {}
        for base in baselines:
            ref = values.get(base)
            ok = ref is not None and ref > 0 and value > 0
            if not ok:
                row[f"vs_{base}"] = None
            else:
                row[f"vs_{base}"] = value / ref if higher_is_better else ref / value
        out[mode] = row
    return out


def ttft_summary(rows: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Min/median/mean/max TTFT per (chunks, size, mode), with ratios against the baselines.

    ``min_reused_tokens``: the fewest chunk tokens the server reported reusing for a request of
    that mode (None: not a blended mode, or never reported); 0 or None for ``reuse``/``blend``
    means those requests were not blended and their times are not CacheBlend's.
    """
    groups: dict[tuple[int, int], dict[str, list[float]]] = {}
    tokens: dict[tuple[int, int], int] = {}
    reused: dict[tuple[int, int, str], list[int]] = {}
    for row in rows:
        key = (row["chunks"], row["chunk_size"])
        groups.setdefault(key, {}).setdefault(row["mode"], []).append(row["ttft_s"])
        tokens[key] = row["prompt_tokens"]
        if row.get("reused_tokens") is not None:
            reused.setdefault((*key, row["mode"]), []).append(row["reused_tokens"])
    out: list[dict[str, Any]] = []
    for key, modes in groups.items():
        stats = {mode: summarize(times) for mode, times in modes.items()}
        ratios = ratios_against({m: s.median for m, s in stats.items()}, TTFT_BASELINES,
                                higher_is_better=False)
        for mode, s in stats.items():
            out.append({"chunks": key[0], "chunk_size": key[1], "prompt_tokens": tokens[key],
                        "mode": mode, "n": s.n, "min_s": s.min, "median_s": s.median,
                        "mean_s": s.mean, "max_s": s.max, **ratios[mode],
                        "min_reused_tokens": min(reused.get((*key, mode), [None]), key=_none_low)})
    return out


def unblended_warnings(ttft: Sequence[Mapping[str, Any]]) -> list[str]:
    """One line per reuse/blend summary row whose requests the server did not blend."""
    return [f"WARNING: {r['mode']} at {shape_label(r['chunks'], r['chunk_size'])} was not "
            "blended (the server reported no reused chunk tokens); its times are not CacheBlend's"
            for r in ttft if r["mode"] not in TTFT_BASELINES and not r["min_reused_tokens"]]


def _none_low(value: int | None) -> float:
    """Sort key that ranks None below every count, so ``min`` keeps "never reported" visible."""
    return -1 if value is None else value


def load_summary(rows: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Requests/s and latency per (loop, mode), with throughput ratios against the baselines.

    A loop's throughput is completed requests over the time from its start to its last
    completion.
    """
    groups: dict[str, dict[str, list[Mapping[str, Any]]]] = {}
    for row in rows:
        groups.setdefault(row["loop"], {}).setdefault(row["mode"], []).append(row)
    out: list[dict[str, Any]] = []
    for loop, modes in groups.items():
        rps = {mode: len(rs) / max(r["end_s"] for r in rs) for mode, rs in modes.items()}
        ratios = ratios_against(rps, BASELINES, higher_is_better=True)
        for mode, rs in modes.items():
            lat = summarize(r["latency_s"] for r in rs)
            out.append({"loop": loop, "mode": mode, "completed": len(rs),
                        "requests_per_s": rps[mode], "median_latency_s": lat.median,
                        "max_latency_s": lat.max, **ratios[mode]})
    return out


def write_outputs(out: Path, name: str, config: dict[str, Any], rows: list[dict[str, Any]],
                  skipped: list[dict[str, Any]]) -> dict[str, Path]:
    """``<name>.json``/``.csv`` (:mod:`results`), ``<name>.md`` and ``<name>_ttft.png``."""
    from sglang_cacheblend.eval.plots import plot_ttft_vs_length
    from sglang_cacheblend.eval.results import provenance, write_results

    ttft = ttft_summary([r for r in rows if r["phase"] == "ttft"])
    load = load_summary([r for r in rows if r["phase"] == "load"])
    summary = {"ttft": ttft, "load": load, "skipped": skipped}
    info = provenance()
    paths = write_results(out, name, config=config, rows=rows, summary=summary,
                          provenance_info=info)
    series: dict[str, list[tuple[float, ...]]] = {}
    for r in ttft:
        series.setdefault(r["mode"], []).append(
            (r["prompt_tokens"], r["median_s"], r["min_s"], r["max_s"]))
    png = plot_ttft_vs_length(series, out / f"{name}_ttft.png",
                              title="TTFT vs prompt length (median, min-max)")
    for warning in unblended_warnings(ttft):
        print(warning, file=sys.stderr)
    md = out / f"{name}.md"
    md.write_text(markdown_report(config, info, summary, png.name))
    return {"json": paths.json, "csv": paths.csv, "md": md, "png": png}


def _x(value: float | None) -> str:
    """A ratio cell: ``2.50x``, or ``-`` where the baseline was not measured."""
    return "-" if value is None else f"{value:.2f}x"


def _load_shape(config: Mapping[str, Any]) -> str:
    """The throughput prompt's shape: ``6 chunks x 512 tokens`` or ``6 passages``."""
    if config.get("whole_passages"):
        return f"{config['load_chunks']} passages"
    return f"{config['load_chunks']} chunks x {config['load_chunk_size']} tokens"


def markdown_report(config: Mapping[str, Any], info: Mapping[str, Any],
                    summary: Mapping[str, Any], png_name: str) -> str:
    """The human-readable table: every mode as ratios against the baselines of the same run."""
    git, machine = info["git"], info["machine"]
    commit = (git["commit"] or "unknown")[:12] + (" (dirty)" if git["dirty"] else "")
    ram = f"{machine['ram_bytes'] / 2**30:.0f} GiB RAM" if machine["ram_bytes"] else "RAM unknown"
    dense = any(r["mode"] == DENSE for r in summary["ttft"])  # its column only when measured
    lines = [
        "# Serving benchmark: full prefill, prefix cache, full KV reuse, CacheBlend", "",
        f"Command: `{config.get('command_line', 'sglang-cacheblend bench')}`  ",
        (f"Date {info['date']}; commit {commit}; {machine['cpu_model']}, {machine['cpu_cores']} "
         f"cores, {ram}; torch {machine['torch']}, sglang {machine['sglang']}; load average "
         f"{[round(x, 2) for x in machine['load_avg'] or []]}; wall {config['wall_s']:.0f} s."),
        "",
        ("Ratios are against the baselines measured in this run (>1 is better): TTFT as "
         "baseline/mode, throughput as mode/baseline. Compare ratios, not seconds. "
         "`reused tokens`: the fewest chunk tokens the server reported reusing for the mode's "
         "requests (0 or - for reuse/blend means they were not blended)."),
        "", "## TTFT", "",
        ("| chunks x size | prompt tokens | mode | n | min s | median s | max s | vs full "
         "| vs prefix | vs prefix reordered |" + (" vs dense SDPA |" if dense else "")
         + " reused tokens (min) |"),
        "|---|---|---|---|---|---|---|---|---|---|" + ("---|" if dense else "") + "---|",
    ]
    for r in summary["ttft"]:
        lines.append(
            f"| {shape_label(r['chunks'], r['chunk_size'])} | {r['prompt_tokens']} | {r['mode']} "
            f"| {r['n']} | {r['min_s']:.2f} | {r['median_s']:.2f} | {r['max_s']:.2f} "
            f"| {_x(r['vs_full'])} | {_x(r['vs_prefix'])} | {_x(r['vs_prefix_reordered'])} "
            + (f"| {_x(r['vs_dense_sdpa'])} " if dense else "")
            + f"| {'-' if r['min_reused_tokens'] is None else r['min_reused_tokens']} |")
    lines += ["", f"![TTFT vs prompt length]({png_name})", ""]
    for warning in unblended_warnings(summary["ttft"]):
        lines += [f"**{warning}**", ""]
    if summary["load"]:
        lines += [
            (f"## Throughput ({_load_shape(config)}, at most {config['load_requests']} "
             f"requests or {config['load_seconds']:g} s per loop)"),
            "",
            ("| loop | mode | completed | req/s | median latency s | max latency s | vs full "
             "| vs prefix | vs prefix reordered |"),
            "|---|---|---|---|---|---|---|---|---|",
        ]
        for r in summary["load"]:
            lines.append(
                f"| {r['loop']} | {r['mode']} | {r['completed']} | {r['requests_per_s']:.3f} "
                f"| {r['median_latency_s']:.2f} | {r['max_latency_s']:.2f} | {_x(r['vs_full'])} "
                f"| {_x(r['vs_prefix'])} | {_x(r['vs_prefix_reordered'])} |")
        lines.append("")
    for s in summary["skipped"]:
        lines.append(f"Skipped {shape_label(s['chunks'], s['chunk_size'])}: {s['prompt_tokens']} "
                     f"tokens, over the model's context of {s['context_len']}.")
    return "\n".join(lines).rstrip() + "\n"
