"""The evaluation's figures, drawn from plain data (lists and dicts) with matplotlib's Agg.

* :func:`plot_quality_vs_ratio`: a quality metric against the recompute ratio, one line per
  series (e.g. per selector), with horizontal lines for full prefill and full reuse;
* :func:`plot_gap_recovered`: bar chart of the share of the reuse-to-full KL gap each mode closes;
* :func:`plot_ttft_vs_length`: TTFT against prompt length, one line per mode;
* :func:`plot_paired_kl`: one mode's KL against others', item by item (below the diagonal: the
  first mode is closer to full prefill on that item).

Each function writes a PNG to ``out_path`` (parent folders created) and returns the path. The Agg
backend is chosen per figure (``Figure`` + ``FigureCanvasAgg``), so importing this module never
touches the global pyplot state and works without a display.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

Point = Sequence[float]


def plot_quality_vs_ratio(
    series: Mapping[str, Sequence[Point]],
    out_path: Path | str,
    *,
    full_prefill: float | None,
    full_reuse: float | None,
    ylabel: str = "mean KL(full || mode)",
    title: str = "Quality vs recompute ratio",
) -> Path:
    """Lines of ``(ratio, value)`` points per series, plus the two reference levels.

    ``full_prefill``/``full_reuse``: the metric's value for full prefill (KL 0, or its F1) and for
    plain reuse at ratio 0, drawn as horizontal lines; None leaves a line out.
    """
    _check_series(series, 2)
    fig, ax = _figure()
    for label, points in series.items():
        points = sorted(points)
        ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=label)
    if full_prefill is not None:
        ax.axhline(full_prefill, color="tab:green", linestyle="--", label="full prefill")
    if full_reuse is not None:
        ax.axhline(full_reuse, color="tab:red", linestyle=":", label="full KV reuse")
    ax.set_xlabel("recompute ratio")
    ax.set_ylabel(ylabel)
    return _finish(fig, ax, title, out_path)


def plot_gap_recovered(
    shares: Mapping[str, float],
    out_path: Path | str,
    *,
    title: str = "Share of the reuse-to-full-prefill KL gap recovered",
) -> Path:
    """One bar per mode; ``shares`` are fractions (0.26 is drawn as 26%), may be negative."""
    if not shares:
        raise ValueError("plot_gap_recovered needs at least one mode")
    fig, ax = _figure()
    labels = list(shares)
    values = [100.0 * shares[k] for k in labels]
    bars = ax.bar(range(len(labels)), values, color="tab:blue")
    ax.bar_label(bars, labels=[f"{v:.0f}%" for v in values], padding=2)
    ax.set_xticks(range(len(labels)), labels, rotation=20, ha="right")
    ax.axhline(0.0, color="black", linewidth=0.8)
    ax.axhline(100.0, color="tab:green", linestyle="--", linewidth=0.8, label="full prefill")
    ax.set_ylabel("gap recovered (%)")
    return _finish(fig, ax, title, out_path)


def plot_ttft_vs_length(
    series: Mapping[str, Sequence[Point]],
    out_path: Path | str,
    *,
    log_y: bool = False,
    title: str = "Time to first token vs prompt length",
) -> Path:
    """Lines of TTFT per mode against prompt tokens.

    Each point is ``(prompt_tokens, median_s)`` or ``(prompt_tokens, median_s, min_s, max_s)``;
    with four values the min-max range is drawn as an error bar.
    """
    _check_series(series, 2)
    fig, ax = _figure()
    for label, points in series.items():
        points = sorted(points)
        xs = [p[0] for p in points]
        ys = [p[1] for p in points]
        if all(len(p) >= 4 for p in points):
            err = [[p[1] - p[2] for p in points], [p[3] - p[1] for p in points]]
            ax.errorbar(xs, ys, yerr=err, marker="o", capsize=3, label=label)
        else:
            ax.plot(xs, ys, marker="o", label=label)
    ax.set_xlabel("prompt tokens")
    ax.set_ylabel("TTFT (s)")
    if log_y:
        ax.set_yscale("log")
    return _finish(fig, ax, title, out_path)


def plot_paired_kl(
    pairs: Mapping[str, Sequence[Point]],
    out_path: Path | str,
    *,
    reference: str,
    title: str = "KL to full prefill, item by item",
) -> Path:
    """A scatter per compared mode of ``(KL of that mode, KL of reference)`` per item, log
    axes, and the diagonal: a mean hides whether a win is broad or a few items' doing."""
    _check_series(pairs, 2)
    fig, ax = _figure()
    values = [v for points in pairs.values() for p in points for v in p[:2] if v > 0]
    if not values:
        raise ValueError("plot_paired_kl needs positive KLs (log axes)")
    for label, points in pairs.items():
        kept = [p for p in points if p[0] > 0 and p[1] > 0]
        ax.scatter([p[0] for p in kept], [p[1] for p in kept], s=14, alpha=0.7, label=label)
    lo, hi = min(values) / 1.5, max(values) * 1.5
    ax.plot([lo, hi], [lo, hi], color="black", linewidth=0.8, label="equal")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlim(lo, hi)
    ax.set_ylim(lo, hi)
    ax.set_xlabel("KL of the compared mode")
    ax.set_ylabel(f"KL of {reference}")
    return _finish(fig, ax, title, out_path)


def _check_series(series: Mapping[str, Sequence[Point]], width: int) -> None:
    if not series:
        raise ValueError("need at least one series to plot")
    for label, points in series.items():
        if not points:
            raise ValueError(f"series {label!r} has no points")
        for point in points:
            if len(point) < width:
                raise ValueError(f"series {label!r}: point {tuple(point)} needs {width} values")


def _figure() -> tuple[Figure, object]:
    fig = Figure(figsize=(7.0, 4.5), dpi=120)
    FigureCanvasAgg(fig)
    return fig, fig.add_subplot()


def _finish(fig: Figure, ax: object, title: str, out_path: Path | str) -> Path:
    ax.set_title(title)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize="small")
    fig.tight_layout()
    path = Path(out_path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png")
    return path
