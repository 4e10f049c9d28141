"""How much of the reuse-to-full KL gap can any choice of rows close? Oracles, offline.

A selector is judged by the share of the KL gap between plain chunk reuse and full prefill that
its recomputed rows close (:mod:`.selector_sweep`). This script asks what the best possible
choice of the same number of rows would close, so a selector's figure can be read against a
ceiling rather than against 100%. Per item (the sweep's prompt, continuation and teacher forcing:
:func:`.fidelity.prepare_item`) it ranks the reused rows two ways that a real selector
cannot (both read the full prefill):

* ``deviation``: the row's true KV error, ``|K_full - K_cached|^2 + |V_full - V_cached|^2``
  summed over the layers after the check layer (each layer normalised by its mean KV norm);
* ``gradient``: the row's first-order effect on the continuation's KL: the gradient of the KL of
  plain reuse with respect to the row's cached K/V, dotted with its error ``full - cached``, in
  absolute value, summed over layers (an autograd pass through the blended forward).

and for each ranking and budget reports two outcomes:

* ``exact``: the chosen rows get the full prefill's K/V in every layer and the rest stay cached
  (what recomputing them could give at best);
* ``recompute``: the chosen rows are recomputed by the blend from the check layer on, as any
  selector's rows are (what a selector with that ranking would reach).

The selectors under test (``--selectors``) run in the same loop. Usage (what produced
``docs/results/selection_ceiling.*``)::

    python -m sglang_cacheblend.eval.offline.selection_ceiling --items 10 --passages 4 \\
        --out docs/results/selection_ceiling
"""

from __future__ import annotations

import argparse
import shlex
import statistics
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from sglang_cacheblend.blend.budget import selection_budget
from sglang_cacheblend.blend.decoder import DecoderOps
from sglang_cacheblend.blend.forward import blend_layers, blended_prefill
from sglang_cacheblend.blend.selection import Selector
from sglang_cacheblend.config import BlendConfig
from sglang_cacheblend.eval.offline.fidelity import (
    ItemContext,
    continuation_kl,
    load_offline_model,
    prepare_item,
    teacher_forced,
)

__all__ = ["deviation_ranking", "gradient_ranking", "main"]


class _RankedRows(Selector):
    """An oracle as a selector: fixed scores by position (not in the registry on purpose)."""

    name = "oracle"

    def __init__(self, by_position: torch.Tensor) -> None:
        self.by_position = by_position

    def score(self, inputs: Any) -> torch.Tensor:
        return self.by_position[inputs.positions.long()].float()


class _ListKVStore:
    """A RequestKV with one tensor per layer, written out of place, so autograd can go through
    the blend's writes (the tensor store writes views of one buffer in place)."""

    def __init__(self, k: torch.Tensor, v: torch.Tensor) -> None:
        self.k, self.v = list(k.unbind(0)), list(v.unbind(0))
        self.kv_len = k.shape[1]

    def cached(self, layer: int, rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.k[layer][rows], self.v[layer][rows]

    def write(self, layer: int, rows: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        self.k[layer] = self.k[layer].index_put((rows,), k)
        self.v[layer] = self.v[layer].index_put((rows,), v)

    def keys_values(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.k[layer], self.v[layer]


def _differentiable(ops: DecoderOps) -> DecoderOps:
    """The transformers ops without their ``no_grad`` wrappers (a subclass, nothing patched)."""
    base = type(ops)

    class GradOps(base):  # type: ignore[misc, valid-type]
        pass

    for name in ("embed", "qkv", "attn_out", "mlp", "logits"):
        setattr(GradOps, name, getattr(base, name).__wrapped__)
    grad_ops = object.__new__(GradOps)
    grad_ops.__dict__.update(ops.__dict__)
    return grad_ops


def deviation_ranking(full_k: torch.Tensor, full_v: torch.Tensor, ctx: ItemContext,
                      check_layer: int) -> torch.Tensor:
    """``(N,)`` true KV error per row over the layers after the check layer (see module doc)."""
    def normalised(full: torch.Tensor, cached: torch.Tensor) -> torch.Tensor:
        err = (full - cached).float().square().sum((-1, -2))  # (L, N)
        return err / full.float().square().sum((-1, -2)).mean(1, keepdim=True)
    dev = normalised(full_k, ctx.cached_k) + normalised(full_v, ctx.cached_v)
    return dev[check_layer + 1:].sum(0)


def gradient_ranking(ops: DecoderOps, ctx: ItemContext, full_k: torch.Tensor,
                     full_v: torch.Tensor, check_layer: int) -> torch.Tensor:
    """``(N,)`` |first-order KL effect| per row of swapping its cached KV for the exact one."""
    grad_ops = _differentiable(ops)
    params = list(ops._model.parameters())  # the wrapped transformers model
    flags = [p.requires_grad for p in params]
    for p in params:
        p.requires_grad_(False)
    try:
        cached_k = ctx.cached_k.clone().requires_grad_()
        cached_v = ctx.cached_v.clone().requires_grad_()
        with torch.enable_grad():
            store = _ListKVStore(cached_k, cached_v)
            positions = torch.arange(ctx.input_ids.numel())
            hidden = grad_ops.embed(ctx.input_ids)
            blend_layers(grad_ops, hidden, positions, ctx.reuse_mask, store,
                         BlendConfig(recompute_ratio=0.0, check_layer=check_layer))
            logprobs = teacher_forced(grad_ops, torch.stack(store.k), torch.stack(store.v),
                                      grad_ops.logits(hidden[-1:])[0], ctx.continuation)
            continuation_kl(ctx, logprobs).mean().backward()
    finally:
        for p, flag in zip(params, flags):
            p.requires_grad_(flag)
    effect = ((cached_k.grad * (full_k - ctx.cached_k)).sum((-1, -2))
              + (cached_v.grad * (full_v - ctx.cached_v)).sum((-1, -2)))
    return effect[check_layer + 1:].abs().sum(0)


def _run_kl(ops: DecoderOps, ctx: ItemContext, config: BlendConfig,
            cached: tuple[torch.Tensor, torch.Tensor] | None = None,
            selector: Selector | None = None) -> tuple[float, float]:
    """KL to full prefill and recomputed fraction of one blended prefill."""
    k, v = cached if cached is not None else (ctx.cached_k, ctx.cached_v)
    res = blended_prefill(ops, ctx.input_ids, torch.arange(ctx.input_ids.numel()),
                          ctx.reuse_mask, k, v, config, selector)
    logprobs = teacher_forced(ops, res.k, res.v, res.logits, ctx.continuation)
    return float(continuation_kl(ctx, logprobs).mean()), res.recomputed_rows / res.full_rows


def evaluate_item(ops: DecoderOps, ctx: ItemContext, budgets: Sequence[float],
                  selectors: Sequence[str], check_layer: int = 1) -> list[dict[str, Any]]:
    """Every method x budget on one item: rows of ``{item, method, budget, kl, recomputed}``."""
    rows = []

    def add(method: str, budget: float, kl: float, recomputed: float) -> None:
        rows.append({"item": ctx.index, "method": method, "budget": budget, "kl": kl,
                     "recomputed": recomputed})

    with torch.no_grad():
        full = blended_prefill(ops, ctx.input_ids, torch.arange(ctx.input_ids.numel()),
                               ctx.reuse_mask, ctx.cached_k, ctx.cached_v,
                               BlendConfig(recompute_ratio=1.0))
        add("reuse", 0.0, *_run_kl(ops, ctx, BlendConfig(recompute_ratio=0.0,
                                                        check_layer=check_layer)))
    grad = gradient_ranking(ops, ctx, full.k, full.v, check_layer)
    rankings = {"deviation": deviation_ranking(full.k, full.v, ctx, check_layer),
                "gradient": grad}
    mask = ctx.reuse_mask
    num_reused = int(mask.sum())
    with torch.no_grad():
        for budget in budgets:
            config = BlendConfig(recompute_ratio=budget, check_layer=check_layer)
            for name in selectors:
                add(name, budget, *_run_kl(ops, ctx, BlendConfig(
                    recompute_ratio=budget, check_layer=check_layer, selector=name)))
            for name, score in rankings.items():
                score = torch.where(mask, score, torch.full_like(score, -torch.inf))
                chosen = torch.zeros_like(mask)
                chosen[torch.argsort(score, descending=True, stable=True)[
                    :selection_budget(budget, num_reused)]] = True
                exact = (torch.where(chosen[None, :, None, None], full.k, ctx.cached_k),
                         torch.where(chosen[None, :, None, None], full.v, ctx.cached_v))
                kl, _ = _run_kl(ops, ctx, BlendConfig(recompute_ratio=0.0,
                                                      check_layer=check_layer), exact)
                add(f"{name} oracle, exact KV", budget, kl, float("nan"))
                add(f"{name} oracle, recomputed", budget,
                    *_run_kl(ops, ctx, config, selector=_RankedRows(score)))
    return rows


def summarize(rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per (method, budget): mean KL, gap recovered against reuse on the same items."""
    reuse = {r["item"]: r["kl"] for r in rows if r["method"] == "reuse"}
    groups: dict[tuple[str, float], list[dict[str, Any]]] = {}
    for r in rows:
        if r["method"] != "reuse":
            groups.setdefault((r["method"], r["budget"]), []).append(r)
    table = []
    for (method, budget), got in groups.items():
        kl = statistics.fmean(r["kl"] for r in got)
        kl_reuse = statistics.fmean(reuse[r["item"]] for r in got)
        rec = [r["recomputed"] for r in got if r["recomputed"] == r["recomputed"]]
        table.append({"method": method, "budget": budget, "items": len(got), "kl": kl,
                      "kl_reuse": kl_reuse, "gap_recovered": (kl_reuse - kl) / kl_reuse,
                      "recomputed": statistics.fmean(rec) if rec else None})
    return table


def markdown(table: Sequence[dict[str, Any]], command: str, info: str) -> str:
    budgets = sorted({r["budget"] for r in table})
    methods = list(dict.fromkeys(r["method"] for r in table))
    cell = {(r["method"], r["budget"]): r for r in table}
    lines = [
        "# Selection ceiling: how much of the KL gap any choice of rows can close", "",
        f"Command: `{command}`  ", info, "",
        ("Share of the reuse-to-full KL gap recovered (mean KL over full prefill's greedy "
         "continuation, teacher-forced; gap on mean KLs over the items). Oracles read the full "
         "prefill: `deviation` ranks rows by their true KV error after the check layer, "
         "`gradient` by the first-order effect of their error on the continuation's KL. "
         "`exact KV`: the chosen rows get the full prefill's KV in every layer; `recomputed`: "
         "the blend recomputes them, as it does a selector's rows."), "",
        "| method | " + " | ".join(f"{b:g}" for b in budgets) + " |",
        "|---|" + "---|" * len(budgets),
    ]
    for m in methods:
        cells = [f"{100 * cell[(m, b)]['gap_recovered']:.0f}%" if (m, b) in cell else "-"
                 for b in budgets]
        lines.append(f"| {m} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot(table: Sequence[dict[str, Any]], out_path: Path) -> None:
    """Gap recovered vs budget, one line per method."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(8, 5))
    FigureCanvasAgg(fig)
    ax = fig.subplots()
    for method in dict.fromkeys(r["method"] for r in table):
        pts = sorted((r["budget"], 100 * r["gap_recovered"]) for r in table
                     if r["method"] == method)
        style = "--" if "oracle" in method else "-"
        ax.plot(*zip(*pts), style, marker="o", label=method)
    ax.axhline(90, color="tab:green", linestyle=":", linewidth=1, label="target (90%)")
    ax.set_xlabel("recompute budget (share of reused rows)")
    ax.set_ylabel("KL gap recovered vs reuse (%)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.suptitle("Selectors against oracles that read the full prefill")
    fig.tight_layout()
    fig.savefig(out_path, dpi=120)


def main(argv: Sequence[str] | None = None) -> None:
    from tqdm import tqdm

    from sglang_cacheblend.dataset import DEFAULT_DATA_PATH, load_items
    from sglang_cacheblend.eval.results import provenance, write_results

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA_PATH)
    parser.add_argument("--items", type=int, default=10)
    parser.add_argument("--start", type=int, default=0)
    parser.add_argument("--passages", type=int, default=4)
    parser.add_argument("--tokens", type=int, default=16)
    parser.add_argument("--budgets", type=float, nargs="+", default=[0.15, 0.3])
    parser.add_argument("--selectors", nargs="*", default=["v_deviation", "question_lookahead"])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--chunk-context", default="none",
                        help="compute each chunk's KV after the sink plus this context, as a "
                             "server with --cacheblend-chunk-context does (builtin[:N], a file, "
                             "or none)")
    parser.add_argument("--out", type=Path, default=Path("docs/results/selection_ceiling"))
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    command = "python -m sglang_cacheblend.eval.offline.selection_ceiling " + shlex.join(
        sys.argv[1:] if argv is None else argv)

    from sglang_cacheblend.context_text import resolve_context

    ops, encode, _, stop_ids, sink = load_offline_model(torch.float32)
    context = resolve_context(args.chunk_context)
    sink = (*sink, *(encode(context) if context else ()))  # chunk KV after sink + context
    rows: list[dict[str, Any]] = []
    started = time.perf_counter()
    for item in tqdm(load_items(args.data)[args.start: args.start + args.items], desc="items"):
        with torch.no_grad():
            ctx = prepare_item(ops, encode, item, args.passages, args.tokens, sink, stop_ids,
                               torch.float32)
        rows += evaluate_item(ops, ctx, args.budgets, args.selectors)
    table = summarize(rows)
    prov = provenance()
    config = {"command": command, **{k: str(v) for k, v in vars(args).items()}}
    write_results(args.out.parent, args.out.name, config=config, rows=rows,
                  summary={"table": table, "seconds": time.perf_counter() - started},
                  provenance_info=prov)
    items = sorted({r["item"] for r in rows})
    info = (f"Items {items[0]}..{items[-1]} of `{args.data.name}`, {args.passages} passages, "
            f"float32, {args.threads} threads; commit {(prov['git']['commit'] or '?')[:7]}"
            f"{' (dirty tree)' if prov['git']['dirty'] else ''}; {prov['date']}.")
    args.out.with_suffix(".md").write_text(markdown(table, command, info))
    plot(table, args.out.with_suffix(".png"))


if __name__ == "__main__":
    main()
