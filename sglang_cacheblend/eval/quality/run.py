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
- with ``--families`` (``random:N``, ``bm25:N``, ``fixed:N``, ``own``;
  :mod:`sglang_cacheblend.eval.context_families`): reuse and the server selector at
  ``--main-ratio`` on chunks each precomputed after a context of its own (``<family> ...``
  modes; ``own``, the prompt's other passages, is an upper bound).

Per item and mode: mean KL to full prefill over full prefill's greedy continuation
(teacher-forced on the KV the prompt alone produced; distributions on full prefill's top-k ids
plus "rest", see :mod:`sglang_cacheblend.eval.teacher_forcing`), the continuation's mean
log-probability, whether the mode's own greedy answer equals full prefill's, answer token-F1
against full prefill's answer and against the dataset's answers, and the blend's accounting
from ``meta_info["cacheblend"]``. Headline: the share of the reuse-to-full KL gap a mode
recovers, ``(KL_reuse - KL_mode) / KL_reuse``. Results go to ``<out>/quality.{json,csv,md}``
with plots (:mod:`.report`); the modes of a run are listed by :mod:`.modes`.
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Callable, Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from tqdm import tqdm

from sglang_cacheblend.dataset import build_prompt, encoder, load_items, tokenize_prompt
from sglang_cacheblend.eval.context_families import Corpus, context_ids, parse_family
from sglang_cacheblend.eval.metrics import best_f1, mean_coarse_kl, mean_over_positions, token_f1
from sglang_cacheblend.eval.quality.modes import QualityConfig, modes_for
from sglang_cacheblend.eval.quality.report import merge_runs, summarize_modes, write_report
from sglang_cacheblend.eval.results import provenance
from sglang_cacheblend.eval.teacher_forcing import FULL, TeacherForcer

DEFAULT_OUT = Path("docs/results/quality")


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


def add_arguments(parser: argparse.ArgumentParser) -> None:
    defaults = QualityConfig()
    parser.add_argument("--data", type=Path, default=defaults.data)
    parser.add_argument("--start", type=int, default=defaults.start, help="first item index")
    parser.add_argument("--items", type=int, default=defaults.items)
    parser.add_argument("--passages", type=int, default=defaults.passages)
    parser.add_argument("--max-new-tokens", type=int, default=defaults.max_new_tokens)
    parser.add_argument("--top-k", type=int, default=defaults.top_k,
                        help="full prefill's top ids per position that distributions are "
                             "compared on")
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
