"""``sglang-cacheblend eval``: answer quality and fidelity to full prefill, per mode, in one run.

For every item of a musique_dev-format file, one server serves the same RAG prompt (instruction,
the first ``--passages`` passages as chunks, the question) under each mode:

- ``full``: blending off (a plain request; SGLang's prefix cache serves the same exact KV, so
  its quality is full prefill's by construction and is not scored separately);
- ``reuse``: every chunk's standalone KV reused, nothing recomputed after the check layer
  (ratio 0);
- ``blend@R``: CacheBlend at each ratio of ``--ratios`` with the server's selector;
- at ``--main-ratio``: each selector of ``--selectors`` and a gradual schedule
  (``2R`` at the check layer narrowed to ``R`` by ``--gradual-end-layer``);
- with ``--chunk-context`` (``builtin[:N]`` or a file; the server computes chunk KV after it):
  every mode above twice, on standalone chunk KV (its plain name) and on context-conditioned
  chunk KV (``ctx <name>``), on the same server, so both are scored against the same full
  prefill and the gap is always measured from standalone reuse;
- with ``--families`` (``random:N``, ``bm25:N``, ``fixed:N``, ``own``; :mod:`.context_families`): reuse and
  the server selector at ``--main-ratio`` on chunks each precomputed after a context of its
  own (``<family> ...`` modes; ``own``, the prompt's other passages, is an upper bound).

Per item and mode: mean KL to full prefill over full prefill's greedy continuation
(teacher-forced on the KV the prompt alone produced; distributions on full prefill's top-k ids
plus "rest", see :mod:`.teacher_forcing`), the continuation's mean log-probability, whether the
mode's own greedy answer equals full prefill's, answer token-F1 against full prefill's answer
and against the dataset's answers, and the blend's accounting from ``meta_info["cacheblend"]``.
Headline: the share of the reuse-to-full KL gap a mode recovers, ``(KL_reuse - KL_mode) /
KL_reuse``. Results go to ``<out>/quality.{json,csv,md}`` with plots.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from tqdm import tqdm

from sglang_cacheblend.config import BlendConfig
from sglang_cacheblend.eval.context_families import Corpus, context_ids, family_label, parse_family
from sglang_cacheblend.eval.dataset import (
    DEFAULT_DATA_PATH,
    build_prompt,
    encoder,
    load_items,
    tokenize_prompt,
)
from sglang_cacheblend.eval.metrics import (
    best_f1,
    gap_recovered,
    mean_coarse_kl,
    mean_over_positions,
    summarize,
    token_f1,
)
from sglang_cacheblend.eval.paired import paired_gap
from sglang_cacheblend.eval.plots import plot_gap_recovered, plot_paired_kl, plot_quality_vs_ratio
from sglang_cacheblend.eval.results import provenance, write_results
from sglang_cacheblend.eval.teacher_forcing import FULL, REUSE, Mode, TeacherForcer

DEFAULT_OUT = Path("docs/results/quality")


@dataclass(frozen=True)
class QualityConfig:
    data: Path = DEFAULT_DATA_PATH
    start: int = 0
    items: int = 20
    passages: int = 6
    max_new_tokens: int = 16
    top_k: int = 20
    ratios: tuple[float, ...] = (0.05, 0.15, 0.3, 0.5)
    main_ratio: float = 0.15
    selectors: tuple[str, ...] = ("v_deviation", "k_deviation")
    gradual_end_layer: int | None = 8  # None: no gradual mode
    chunk_context: str | None = None  # the server's --cacheblend-chunk-context, if any
    windows: tuple[int, ...] = ()  # recompute windows scored at the main ratio
    standalone_modes: bool = True  # with a chunk context: False keeps only standalone reuse
    families: tuple[str, ...] = ()  # context families (``random:N``, ``bm25:N``, ``own``)
    skip_modes: tuple[str, ...] = ()  # mode names left out (never full or reuse)


def modes_for(config: QualityConfig) -> list[Mode]:
    """:func:`all_modes_for` less ``config.skip_modes``; ``ValueError`` naming a skipped name
    that is no mode of the run, or full or reuse (every gap is measured against them)."""
    modes = all_modes_for(config)
    names = {mode.name for mode in modes}
    for name in config.skip_modes:
        if name not in names:
            raise ValueError(f"--skip-modes: {name!r} is not a mode of this run "
                             f"(modes: {', '.join(sorted(names))})")
        if name in (FULL.name, REUSE.name):
            raise ValueError(f"--skip-modes: {name!r} cannot be skipped (the gap's baseline)")
    return [mode for mode in modes if mode.name not in config.skip_modes]


def all_modes_for(config: QualityConfig) -> list[Mode]:
    """Full, reuse, the ratio sweep, and the selector / gradual / window variants at the main
    ratio. With a chunk context, all of those on context-conditioned chunk KV (``ctx ...``),
    and beside them standalone reuse (the gap's baseline) and, unless
    ``standalone_modes`` is off, the server selector and the other selectors at the main
    ratio on standalone chunk KV."""
    modes = _modes(config) + _family_modes(config)
    if config.chunk_context is None:
        return modes
    r = config.main_ratio
    standalone = [FULL, dataclasses.replace(REUSE, chunk_context="none")]
    if config.standalone_modes:
        standalone += [dataclasses.replace(m, chunk_context="none") for m in modes
                       if m.blend and m.recompute_ratio == r and m.gradual is None
                       and m.recompute_window is None]
    in_context = [dataclasses.replace(m, name=f"ctx {m.name}", chunk_context="server")
                  for m in modes if m.blend and m.context_family is None]
    return [*standalone, *in_context, *(m for m in modes if m.context_family is not None)]


def _family_modes(config: QualityConfig) -> list[Mode]:
    """Reuse and the server selector at the main ratio, per context family."""
    modes = []
    for spec in map(parse_family, config.families):
        label = family_label(spec)
        modes += [Mode(f"{label} reuse", True, 0.0, context_family=spec.name),
                  Mode(f"{label} blend@{config.main_ratio:g}", True, config.main_ratio,
                       context_family=spec.name)]
    return modes


def _modes(config: QualityConfig) -> list[Mode]:
    r = config.main_ratio
    modes = [FULL, REUSE]
    modes += [Mode(f"blend@{ratio:g}", True, ratio) for ratio in config.ratios]
    modes += [Mode(f"{name}@{r:g}", True, r, selector=name) for name in config.selectors]
    if config.gradual_end_layer is not None:
        start = min(1.0, 2 * r)
        schedule = BlendConfig.linear(start, r, 1, config.gradual_end_layer).gradual
        modes.append(Mode(f"gradual {start:g}->{r:g}", True, r, gradual=schedule))
    modes += [Mode(f"blend@{r:g} window {w}", True, r, recompute_window=w)
              for w in config.windows]
    return modes


def evaluate(base_url: str, config: QualityConfig, decode: Callable[[Sequence[int]], str],
             encode: Callable[[str], Sequence[int]]) -> list[dict[str, Any]]:
    """Score every item under every mode; one row per (item, mode)."""
    every = load_items(config.data)
    items = every[config.start: config.start + config.items]
    scorer = TeacherForcer(base_url)
    modes = modes_for(config)
    families = [parse_family(f) for f in config.families]
    corpus = Corpus(every) if families else None
    rows: list[dict[str, Any]] = []
    for item in tqdm(items, desc="items", unit="item"):
        prompt = tokenize_prompt(build_prompt(item, num_passages=config.passages), encode)
        reference = scorer.reference(prompt, max_new_tokens=config.max_new_tokens,
                                     top_k=config.top_k)
        full_answer = decode(reference.answer_ids)
        precomputed: dict[str, tuple[float, float]] = {}
        full = None
        for mode in modes:
            family = mode.context_family
            if family is not None and family not in precomputed:
                # Right before the family's first mode, so the pool's LRU has not evicted
                # its chunks for the blended prefixes of other modes (a chunk the family
                # lacks would be prefilled in place: exact, and not what is measured).
                spec = next(f for f in families if f.name == family)
                texts = corpus.contexts(spec, item, item.passages[:config.passages])
                ids = [context_ids(t, encode) for t in texts]
                seconds = scorer.precompute(prompt, family, ids)
                precomputed[family] = (seconds, sum(map(len, ids)) / len(ids))
            scored = scorer.score(prompt, reference, mode)
            precompute_s, context_tokens = precomputed.get(mode.context_family, (math.nan, 0))
            full = scored if mode is FULL else full
            answer = decode(scored.answer_ids)
            report = scored.report or {}
            rows.append({
                "item": item.index,
                "mode": mode.name,
                "prompt_tokens": len(prompt.input_ids),
                "kl": mean_coarse_kl(full.support_logprobs, scored.support_logprobs),
                "logprob": mean_over_positions(scored.token_logprobs),
                "answer_matches_full": scored.answer_ids == reference.answer_ids,
                "f1_vs_full": token_f1(answer, full_answer),
                "dataset_f1": best_f1(answer, item.answers),
                "recomputed_fraction": _fraction(report),
                "reused_tokens": report.get("reused_tokens", 0),
                "blend_time_s": report.get("blend_time_s", math.nan),
                "miss_time_s": (report.get("standalone_time_s", math.nan)
                                if report.get("chunk_sources", {}).get("computed") else math.nan),
                "precompute_s": precompute_s,
                "chunks_prefilled_in_place": report.get("chunk_sources", {}).get(
                    "recomputed_in_place", 0),
                "context_tokens": context_tokens,
                "answer": answer,
            })
    return rows


def _fraction(report: dict[str, Any]) -> float:
    """Rows computed summed over layers / rows of a full prefill (1.0 when not blended)."""
    if not report.get("full_rows"):
        return 1.0
    return report["recomputed_rows"] / report["full_rows"]


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
    """JSON + CSV (:mod:`.results`), a Markdown table with the paired comparison, and the
    plots (KL vs ratio, gap per mode, the default's KL item by item).

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
    """The reference mode against every other blended mode, item by item (:mod:`.paired`)."""
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


def add_arguments(parser: argparse.ArgumentParser) -> None:
    defaults = QualityConfig()
    parser.add_argument("--data", type=Path, default=defaults.data)
    parser.add_argument("--start", type=int, default=defaults.start, help="first item index")
    parser.add_argument("--items", type=int, default=defaults.items)
    parser.add_argument("--passages", type=int, default=defaults.passages)
    parser.add_argument("--max-new-tokens", type=int, default=defaults.max_new_tokens)
    parser.add_argument("--top-k", type=int, default=defaults.top_k,
                        help="full prefill's top ids per position that distributions are compared on")
    parser.add_argument("--ratios", type=float, nargs="+", default=list(defaults.ratios))
    parser.add_argument("--main-ratio", type=float, default=defaults.main_ratio)
    parser.add_argument("--selectors", nargs="*", default=list(defaults.selectors),
                        help="selectors compared at --main-ratio (none: skip)")
    parser.add_argument("--gradual-end-layer", type=int, default=defaults.gradual_end_layer)
    parser.add_argument("--no-gradual", action="store_true",
                        help="skip the gradual-filtering mode")
    parser.add_argument("--chunk-context", default="builtin",
                        help="the started server's --cacheblend-chunk-context (default: the "
                             "server's default, builtin); every blended mode is also scored on "
                             "chunk KV computed after it ('ctx' modes). none: standalone chunk "
                             "KV only")
    parser.add_argument("--windows", type=int, nargs="*", default=[],
                        help="recompute windows (contiguous runs of rows) scored at --main-ratio")
    parser.add_argument("--no-standalone", action="store_true",
                        help="with --chunk-context: score only the context-conditioned modes "
                             "(standalone reuse stays, as the gap's baseline)")
    parser.add_argument("--families", nargs="*", default=[], metavar="KIND[:N]",
                        help="context families scored beside the rest: random:N, bm25:N (N "
                             "corpus passages per chunk, never the item's own), fixed:N (the "
                             "shipped context's first N paragraphs) and own (the prompt's other "
                             "passages, an upper bound)")
    parser.add_argument("--skip-modes", nargs="*", default=[], metavar="MODE",
                        help="modes of the run to leave out, by name (e.g. 'ctx v_deviation@0.15'"
                             "), to fit a long run in less time; never full or reuse")
    parser.add_argument("--merge", type=Path, nargs="+", default=None, metavar="DIR",
                        help="no server: merge the quality.json of runs over disjoint items "
                             "(e.g. batches of one command) into one report in --out")
    parser.add_argument("--url", help="a running --enable-cacheblend server (else one is started)")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)


def merge_runs(dirs: Sequence[Path]) -> tuple[QualityConfig, list[dict[str, Any]],
                                              list[dict[str, Any]]]:
    """The rows of several runs' ``quality.json`` (their items must not overlap), the first
    run's config with the merged item count, and each run's provenance (with its folder)."""
    import json

    rows: list[dict[str, Any]] = []
    runs: list[dict[str, Any]] = []
    config = None
    seen: set[tuple[int, str]] = set()
    for folder in dirs:
        record = json.loads((Path(folder) / "quality.json").read_text())
        for row in record["rows"]:
            key = (row["item"], row["mode"])
            if key in seen:
                raise ValueError(f"item {row['item']} mode {row['mode']!r} is in two runs")
            seen.add(key)
            rows.append(row)
        runs.append({"folder": str(folder), **record.get("provenance", {})})
        if config is None:
            values = {k: v for k, v in record["config"].items() if k in QualityConfig.__dataclass_fields__}
            values = {k: tuple(v) if isinstance(v, list) else v for k, v in values.items()}
            config = QualityConfig(**{**values, "data": Path(values["data"])})
    items = sorted({row["item"] for row in rows})
    config = dataclasses.replace(config, start=items[0], items=len(items))
    return config, rows, runs


def run(args: argparse.Namespace, server_args: list[str], command: str) -> int:
    """The CLI entry: start (or use) a server, evaluate, write the report, print the table."""
    from transformers import AutoTokenizer

    if args.merge:
        config, rows, runs = merge_runs(args.merge)
        write_report(args.out, config, rows, summarize_modes(rows), command,
                     {**provenance(), "runs": runs})
        print((args.out / "quality.md").read_text())
        return 0

    from sglang_cacheblend.embedded_model import ensure_model
    from sglang_cacheblend.launch import ServerProcess

    config = QualityConfig(
        data=args.data, start=args.start, items=args.items, passages=args.passages,
        max_new_tokens=args.max_new_tokens, top_k=args.top_k, ratios=tuple(args.ratios),
        main_ratio=args.main_ratio, selectors=tuple(args.selectors),
        gradual_end_layer=None if args.no_gradual else args.gradual_end_layer,
        chunk_context=None if args.chunk_context == "none" else args.chunk_context,
        windows=tuple(args.windows),
        standalone_modes=not args.no_standalone,
        families=tuple(args.families),
        skip_modes=tuple(args.skip_modes),
    )
    for family in config.families:
        parse_family(family)  # a bad spec fails before a server starts
    modes_for(config)  # so does a bad --skip-modes name
    model_path = ensure_model()
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    encode = encoder(tokenizer)
    decode = lambda ids: tokenizer.decode(ids, skip_special_tokens=True)  # noqa: E731
    args.out.mkdir(parents=True, exist_ok=True)
    started = provenance()  # the commit that ran, not the one checked out when it finished
    if args.url:
        rows = evaluate(args.url, config, decode, encode)
    else:
        flags = server_args if "--enable-cacheblend" in server_args else [
            "--enable-cacheblend", *server_args]
        flags = [*flags, "--cacheblend-chunk-context", config.chunk_context or "none"]
        with ServerProcess(args=flags, model_path=model_path,
                           log_path=args.out / "server.log") as server:
            rows = evaluate(server.base_url, config, decode, encode)
    summary = summarize_modes(rows)
    started["finished"] = datetime.now(timezone.utc).isoformat(timespec="seconds")
    write_report(args.out, config, rows, summary, command, started)
    print((args.out / "quality.md").read_text())
    return 0
