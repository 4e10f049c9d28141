"""BlendPlan: the per-request selection state across layers (selective recompute + gradual
filtering), planned once and queried per layer.

Layer schedule for one request of ``num_rows`` rows (its new tokens, in position order) and a
config schedule ``((l_0, r_0), (l_1, r_1), ...)`` with ``l_0 = check_layer``:

    layers 0 .. l_0          all rows
    after layer l_0          keep top round(r_0 * n) reused rows, scored on layer l_0
    layers l_0+1 .. l_1      the kept rows (+ every row without cached KV)
    after layer l_1          keep top round(r_1 * n) among the kept rows, scored on layer l_1
    ...                      until the last step, whose set holds for the remaining layers

``n`` is the number of reused rows of the request (budget: :mod:`.budget`). The row sets shrink
monotonically. Rows without cached KV (missed chunks, the suffix/question) are in every set.

Usage (plan once, run per layer)::

    plan = BlendPlan(config, reuse_mask, num_layers)
    for layer in range(num_layers):
        rows = plan.rows(layer)                 # compute this layer for these rows only
        ...                                     # fresh K/V of ``rows``; others keep cached KV
        if plan.is_selection_layer(layer):
            plan.update(layer, SelectionInputs(...rows of ``rows``...))
    plan.recomputed_rows                       # cost: rows computed summed over layers
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from sglang_cacheblend.blend.budget import select_top_rows, select_top_windows, selection_budget
from sglang_cacheblend.blend.registry import build_selector

if TYPE_CHECKING:
    from sglang_cacheblend.blend.selection import SelectionInputs, Selector
    from sglang_cacheblend.config import BlendConfig

__all__ = ["BlendPlan"]


class BlendPlan:
    """Which rows of one request to compute at each layer.

    Parameters
    ----------
    config : BlendConfig
        Ratio schedule, selector name and minimum count.
    reuse_mask : torch.Tensor
        Shape ``(num_rows,)``, bool, any device. True where the row has cached KV; the returned
        row indices live on this device.
    num_layers : int
        Number of decoder layers; every schedule layer must be ``< num_layers``.
    selector : Selector, optional
        A rule object to use instead of ``config.selector`` (rules under study, or oracles in
        :mod:`sglang_cacheblend.eval.offline.selection_ceiling`, that are not in the registry).
    """

    def __init__(self, config: BlendConfig, reuse_mask: torch.Tensor, num_layers: int,
                 selector: Selector | None = None) -> None:
        if reuse_mask.dim() != 1 or reuse_mask.dtype != torch.bool:
            raise ValueError(
                f"reuse_mask must be 1-D bool, got {tuple(reuse_mask.shape)} {reuse_mask.dtype}"
            )
        schedule = config.schedule
        if num_layers <= schedule[-1][0]:
            raise ValueError(
                f"num_layers={num_layers} must exceed the last selection layer {schedule[-1][0]}"
            )
        self.config = config
        self.num_layers = num_layers
        self.reuse_mask = reuse_mask
        self.num_rows = reuse_mask.shape[0]
        self.num_reused = int(reuse_mask.sum())
        self._selector = build_selector(config.selector) if selector is None else selector
        self._steps = schedule
        self._next_step = 0
        # Row sets by first layer they apply to: [(first_layer, rows), ...]
        all_rows = torch.arange(self.num_rows, device=reuse_mask.device)
        self._segments: list[tuple[int, torch.Tensor]] = [(0, all_rows)]
        self._lookahead_rows = 0

    @property
    def reads_suffix(self) -> bool:
        """True if the selector reads ``suffix_q``/``context_k`` (question-attention rules)."""
        return self._selector.reads_suffix

    @property
    def reads_lookahead(self) -> bool:
        """True if the selector reads ``lookahead_mass`` (:mod:`.lookahead`)."""
        return self._selector.reads_lookahead

    def lookahead_first_layer(self) -> int:
        """First layer whose lookahead masses the selector reads."""
        return self._selector.lookahead_first_layer(self.num_layers)

    def add_lookahead_rows(self, rows: int) -> None:
        """Count rows a suffix lookahead computed (part of :attr:`recomputed_rows`)."""
        if rows < 0:
            raise ValueError(f"rows must be >= 0, got {rows}")
        self._lookahead_rows += rows

    def step_has_choice(self, layer: int) -> bool:
        """True if the pending selection at ``layer`` drops some but not all reused rows of the
        current set (otherwise any score gives the same rows, and costly inputs can be skipped)."""
        if not self.is_selection_layer(layer):
            raise ValueError(f"layer {layer} is not the pending selection layer")
        in_set = int(self.reuse_mask[self.rows(layer)].sum())
        return 0 < self._step_budget(in_set) < in_set

    def _step_budget(self, reused_in_set: int) -> int:
        ratio = self._steps[self._next_step][1]
        budget = selection_budget(ratio, self.num_reused, self.config.min_selected_tokens)
        return min(budget, reused_in_set)  # never grow: monotone subsets

    @property
    def decided_through(self) -> int:
        """Last layer whose rows are known (before the next :meth:`update`)."""
        if self._next_step < len(self._steps):
            return self._steps[self._next_step][0]
        return self.num_layers - 1

    def is_selection_layer(self, layer: int) -> bool:
        """True if :meth:`update` must be called with this layer's inputs."""
        return self._next_step < len(self._steps) and self._steps[self._next_step][0] == layer

    def rows(self, layer: int) -> torch.Tensor:
        """Row indices to compute at ``layer``.

        Returns
        -------
        torch.Tensor
            Shape ``(num_computed,)``, int64, sorted ascending, indices into the request's rows.
        """
        if not 0 <= layer < self.num_layers:
            raise ValueError(f"layer must be in [0, {self.num_layers}), got {layer}")
        if layer > self.decided_through:
            raise RuntimeError(
                f"rows of layer {layer} depend on update() at layer {self.decided_through}"
            )
        for first, rows in reversed(self._segments):
            if layer >= first:
                return rows
        raise AssertionError("unreachable: segment 0 starts at layer 0")

    def update(self, layer: int, inputs: SelectionInputs) -> torch.Tensor:
        """Score ``rows(layer)`` on this layer's K/V and narrow the set for the next layers.

        Parameters
        ----------
        layer : int
            Must be the pending selection layer (:meth:`is_selection_layer`).
        inputs : SelectionInputs
            Row ``i`` is request row ``rows(layer)[i]``; its ``reuse_mask`` must agree with the
            plan's.

        Returns
        -------
        torch.Tensor
            Rows to compute at ``layer + 1`` (same convention as :meth:`rows`).
        """
        if not self.is_selection_layer(layer):
            raise ValueError(f"layer {layer} is not the pending selection layer")
        current = self.rows(layer)
        if inputs.num_rows != current.numel():
            raise ValueError(
                f"inputs have {inputs.num_rows} rows, layer {layer} computes {current.numel()}"
            )
        local_mask = self.reuse_mask[current]
        if not torch.equal(inputs.reuse_mask.to(local_mask.device), local_mask):
            raise ValueError("inputs.reuse_mask disagrees with the plan's reuse_mask")
        in_set = int(local_mask.sum())
        budget = self._step_budget(in_set)
        if 0 < budget < in_set:
            scores = self._selector.score(inputs)
        else:  # keep none or all: the score cannot matter, and its inputs may be skipped
            scores = torch.zeros(inputs.num_rows, dtype=torch.float32)
        scores = scores.to(local_mask.device)
        if self.config.recompute_window > 1:
            keep = select_top_windows(scores, local_mask, budget, self.config.recompute_window)
        else:
            keep = select_top_rows(scores, local_mask, budget, _positions(inputs))
        new_rows = current[keep]
        self._next_step += 1
        self._segments.append((layer + 1, new_rows))
        return new_rows

    @property
    def recomputed_rows(self) -> int:
        """Rows computed summed over the layers decided so far (all layers once planned), the
        rows of suffix lookaheads included: a rule cannot buy quality with uncounted compute."""
        total = self._lookahead_rows
        bounds = [first for first, _ in self._segments[1:]] + [self.decided_through + 1]
        for (first, rows), end in zip(self._segments, bounds):
            total += rows.numel() * (end - first)
        return total

    @property
    def full_rows(self) -> int:
        """Rows a full prefill computes: ``num_rows * num_layers``."""
        return self.num_rows * self.num_layers


def _positions(inputs: SelectionInputs) -> torch.Tensor | None:
    return None if inputs.positions is None else inputs.positions.to(inputs.reuse_mask.device)
