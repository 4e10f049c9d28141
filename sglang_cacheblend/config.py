"""BlendConfig: how much of a blended prompt is recomputed, where, and by which rule.

One frozen, typed dataclass validated in ``__post_init__``; change it only with
``dataclasses.replace`` (which validates again). The numbers here are the knobs of the paper's
selective recompute (Sec. 4.2) and gradual filtering (Sec. 4.3):

* layers ``0 .. check_layer`` run on every token of the request;
* after ``check_layer`` the rule named by ``selector`` scores the reused tokens and keeps the top
  ``ratio`` of them (the selection budget is documented in :mod:`sglang_cacheblend.blend.budget`);
* gradual filtering narrows that set at later layers, re-scoring among the still-selected tokens,
  down to ``recompute_ratio``;
* tokens without cached KV (missed chunks, the suffix/question) are always recomputed.

Ratio 1.0 recomputes everything (it must equal full prefill); ratio 0.0 is full KV reuse (only
the tokens without cached KV are recomputed after the check layer).

Every invalid value raises ValueError naming the field (wrong types included, by design). This
module imports neither torch nor :mod:`sglang_cacheblend.blend` (a test checks it), so option
parsers and clients validate settings without loading the algorithm. It is the one place that
checks them: the server's flags and a request's overrides alike
(:mod:`sglang_cacheblend.options` declares each setting's flag and whether a request may set it).
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass
from typing import Any

__all__ = ["SELECTOR_NAMES", "BlendConfig"]

# The vocabulary of ``BlendConfig.selector``, kept here as plain strings so the config imports
# without torch or the rules; ``sglang_cacheblend.blend.registry`` refuses to import if its rule
# classes drift from it.
SELECTOR_NAMES: tuple[str, ...] = (
    "v_deviation",
    "k_deviation",
    "question_attention",
    "question_attention_cached",
    "attention_x_v_deviation",
    "attention_plus_k_deviation",
    "question_output_error",
    "question_lookahead",
)


def _check_int(name: str, value: Any, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"BlendConfig.{name} must be an int, got {value!r}")  # noqa: TRY004
    if value < minimum:
        raise ValueError(f"BlendConfig.{name} must be >= {minimum}, got {value}")


def _check_ratio(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"BlendConfig.{name} must be a float in [0, 1], got {value!r}")  # noqa: TRY004
    if not (0.0 <= float(value) <= 1.0):  # also rejects NaN
        raise ValueError(f"BlendConfig.{name} must be in [0, 1], got {value}")


@dataclass(frozen=True)
class BlendConfig:
    """Selective-recompute settings of CacheBlend.

    Attributes
    ----------
    recompute_ratio : float
        Target share of a request's reused tokens whose KV is recomputed after the last selection
        step, in ``[0, 1]``. Default 0.15 (the paper's r*; LMCache's default).
    check_layer : int
        0-based layer after which the first selection is made. Layers ``0..check_layer`` run on
        all tokens. Default 1, as in the original code and LMCache (layer 0's KV does not depend
        on other tokens, so layer 1 is the first with any deviation). Layer 0 is cheaper and
        works with every rule, but only the question-attention rules see anything there (the
        ``@L0`` rows of ``docs/results/selector_sweep.md``).
    selector : str
        Name of the scoring rule, one of :data:`SELECTOR_NAMES` (the rule classes are in
        :data:`sglang_cacheblend.blend.registry.SELECTORS`): the
        deviation rules ``"v_deviation"`` (original CacheBlend) and ``"k_deviation"``
        (LMCache); the question-attention rules ``"question_attention"``,
        ``"question_attention_cached"``, ``"attention_x_v_deviation"``,
        ``"attention_plus_k_deviation"`` and ``"question_output_error"`` (they read the
        suffix's queries); ``"question_lookahead"`` (the default), which runs the suffix ahead
        through the later layers on the cached KV and recomputes the rows the question reads
        there. The default is chosen by measurement: in the sweep it closed more of the
        reuse-to-full-prefill KL gap than V deviation at every budget, for a few more computed
        rows (the lookahead's; ``docs/results/selector_sweep_lookahead.md``).
    gradual : tuple of (int, float)
        The gradual-filtering schedule: ``(layer, ratio)`` steps. After computing ``layer`` the
        selection is (re)made with ``ratio``. Empty means a single selection at ``check_layer``
        with ``recompute_ratio`` (what the public implementations do). When non-empty, the first
        step's layer must be ``check_layer``, layers must strictly increase, ratios must not
        increase, and the last ratio must equal ``recompute_ratio``. Use :meth:`linear` to build
        one. ``BlendConfig.linear(0.3, 0.15, 1, 8)`` (V deviation) closed more of the gap than any
        single check at 15% in the sweep, for more computed rows
        (``docs/results/selector_sweep.md``), but it stays opt-in: a non-empty default would have
        to match every ``recompute_ratio`` and ``check_layer`` a caller sets (the server flags
        build gradual schedules with :meth:`linear`).
    min_selected_tokens : int
        Lower bound on the number of reused tokens recomputed by a selection step whose ratio is
        above 0 (short prompts), capped at the number of reused tokens. Default 1.
    min_reused_tokens : int
        Blending pays off only when at least this many tokens of a request come from cached
        chunks; requests with fewer run a normal prefill. Default 256 (LMCache's
        ``blend_min_tokens``).
    recompute_window : int
        Recompute reused rows in contiguous runs of this many rows, within the same budget:
        each selection keeps the non-overlapping windows whose rows score highest in sum
        (:func:`sglang_cacheblend.blend.budget.select_top_windows`). 1 (the default) keeps the
        top rows wherever they are. A read correction for rows that are not recomputed: a
        scattered recomputed row keeps reading its stale neighbours.
    """

    recompute_ratio: float = 0.15
    check_layer: int = 1
    selector: str = "question_lookahead"
    gradual: tuple[tuple[int, float], ...] = ()
    min_selected_tokens: int = 1
    min_reused_tokens: int = 256
    recompute_window: int = 1

    def __post_init__(self) -> None:
        _check_ratio("recompute_ratio", self.recompute_ratio)
        _check_int("check_layer", self.check_layer, 0)
        _check_int("min_selected_tokens", self.min_selected_tokens, 0)
        _check_int("min_reused_tokens", self.min_reused_tokens, 0)
        _check_int("recompute_window", self.recompute_window, 1)
        if not isinstance(self.selector, str) or self.selector not in SELECTOR_NAMES:
            raise ValueError(
                f"BlendConfig.selector must be one of {sorted(SELECTOR_NAMES)}, "
                f"got {self.selector!r}"
            )
        if not isinstance(self.gradual, tuple):
            raise ValueError(f"BlendConfig.gradual must be a tuple, got {self.gradual!r}")  # noqa: TRY004
        self._check_gradual()

    def _check_gradual(self) -> None:
        steps = self.gradual
        if not steps:
            return
        for i, step in enumerate(steps):
            if not isinstance(step, tuple) or len(step) != 2:
                raise ValueError(f"BlendConfig.gradual[{i}] must be a (layer, ratio) tuple")
            _check_int(f"gradual[{i}][0]", step[0], 0)
            _check_ratio(f"gradual[{i}][1]", step[1])
        if steps[0][0] != self.check_layer:
            raise ValueError(
                f"BlendConfig.gradual must start at check_layer={self.check_layer}, "
                f"got layer {steps[0][0]}"
            )
        for (l0, r0), (l1, r1) in itertools.pairwise(steps):
            if l1 <= l0:
                raise ValueError(f"BlendConfig.gradual layers must increase, got {l0} then {l1}")
            if r1 > r0:
                raise ValueError(
                    f"BlendConfig.gradual ratios must not increase, got {r0} then {r1}"
                )
        if not math.isclose(steps[-1][1], self.recompute_ratio, rel_tol=0.0, abs_tol=1e-12):
            raise ValueError(
                f"BlendConfig.gradual must end at recompute_ratio={self.recompute_ratio}, "
                f"got {steps[-1][1]}"
            )

    @property
    def schedule(self) -> tuple[tuple[int, float], ...]:
        """The selection steps ``((layer, ratio), ...)``, single-check included."""
        return self.gradual or ((self.check_layer, float(self.recompute_ratio)),)

    def check_fits_model(self, num_layers: int, *, what: str) -> None:
        """``ValueError`` naming ``what`` if a selection layer is not a layer of a
        ``num_layers``-layer model (checked where the model is known: at launch for the
        server's settings, in the tokenizer for a request's, never inside a forward)."""
        last = self.schedule[-1][0]
        if last >= num_layers:
            raise ValueError(
                f"{what}: selection layer {last} is not a layer of the served model "
                f"({num_layers} layers, numbered 0..{num_layers - 1})"
            )

    @classmethod
    def linear(
        cls,
        start_ratio: float,
        recompute_ratio: float,
        check_layer: int,
        end_layer: int,
        **kwargs: Any,
    ) -> BlendConfig:
        """Gradual filtering from ``start_ratio`` at ``check_layer`` to ``recompute_ratio`` at
        ``end_layer``, one step per layer, ratios interpolated linearly.

        ``BlendConfig.linear(0.3, 0.15, 1, 8)`` is "30% at layer 1 -> 15% by layer 8".
        """
        _check_int("end_layer", end_layer, check_layer)
        _check_ratio("start_ratio", start_ratio)
        if end_layer == check_layer:
            return cls(recompute_ratio=recompute_ratio, check_layer=check_layer, **kwargs)
        span = end_layer - check_layer
        steps = tuple(
            (
                layer,
                float(recompute_ratio)
                if layer == end_layer
                else start_ratio + (recompute_ratio - start_ratio) * (layer - check_layer) / span,
            )
            for layer in range(check_layer, end_layer + 1)
        )
        return cls(
            recompute_ratio=recompute_ratio, check_layer=check_layer, gradual=steps, **kwargs
        )
