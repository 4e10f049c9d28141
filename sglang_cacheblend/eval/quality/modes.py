"""Which modes one ``sglang-cacheblend eval`` run scores: its configuration and the mode list.

The mode names are the rows of the report, so they are part of the results format: ``full``,
``reuse``, ``blend@R``, ``<selector>@R``, ``gradual A->R``, ``blend@R window W``, their ``ctx``
twins on context-conditioned chunk KV, and ``<family> reuse`` / ``<family> blend@R``.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

from sglang_cacheblend.config import BlendConfig
from sglang_cacheblend.dataset import DEFAULT_DATA_PATH
from sglang_cacheblend.eval.context_families import family_label, parse_family
from sglang_cacheblend.eval.teacher_forcing import FULL, REUSE, Mode


@dataclass(frozen=True)
class QualityConfig:
    """One quality run: the items, the prompt shape, the scoring and the modes' knobs."""

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
