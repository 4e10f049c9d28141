"""The three figures render to non-empty PNG files from plain data."""

from __future__ import annotations

from pathlib import Path

import pytest

from sglang_cacheblend.eval.plots import (
    plot_gap_recovered,
    plot_paired_kl,
    plot_quality_vs_ratio,
    plot_ttft_vs_length,
)

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _is_png(path: Path) -> bool:
    data = path.read_bytes()
    return data.startswith(PNG_MAGIC) and len(data) > 2000


def test_quality_vs_ratio(tmp_path: Path):
    series = {
        "v_deviation": [(0.3, 0.077), (0.15, 0.093), (0.5, 0.05)],
        "q_attention": [(0.15, 0.084)],
    }
    out = plot_quality_vs_ratio(series, tmp_path / "sub" / "q.png", full_prefill=0.0,
                                full_reuse=0.1127)
    assert _is_png(out)


def test_gap_recovered_bars(tmp_path: Path):
    out = plot_gap_recovered({"v_deviation": 0.17, "k_deviation": 0.10, "worse": -0.05},
                             tmp_path / "gap.png")
    assert _is_png(out)
    with pytest.raises(ValueError):
        plot_gap_recovered({}, tmp_path / "none.png")


def test_ttft_vs_length_with_and_without_ranges(tmp_path: Path):
    series = {"full": [(3684, 48.0, 47.9, 48.2), (1200, 9.0, 8.5, 9.4)],
              "blend@0.15": [(1200, 3.0), (3684, 10.8)]}
    out = plot_ttft_vs_length(series, tmp_path / "ttft.png", log_y=True)
    assert _is_png(out)
    with pytest.raises(ValueError, match="needs 2 values"):
        plot_ttft_vs_length({"full": [(1,)]}, tmp_path / "bad.png")


def test_paired_kl_scatter(tmp_path: Path):
    out = plot_paired_kl({"reuse": [(0.1, 0.05), (0.02, 0.03)], "v_deviation": [(0.08, 0.05)]},
                         tmp_path / "paired.png", reference="default")
    assert _is_png(out)
    with pytest.raises(ValueError, match="positive"):
        plot_paired_kl({"reuse": [(0.0, 0.0)]}, tmp_path / "zero.png", reference="default")
