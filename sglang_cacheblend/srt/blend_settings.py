"""A request's effective blend settings: the server's, with the request's own overrides.

Computed once, in the tokenizer process, and checked there against the served model, so a
setting the model cannot run (a selection layer at or past its depth) is an HTTP 400 for that
request and never an exception inside the scheduler's forward.
"""

from __future__ import annotations

import dataclasses

from sglang_cacheblend.chunks import ClientAction
from sglang_cacheblend.config import BlendConfig

__all__ = ["check_fits_model", "effective_config"]


def effective_config(server: BlendConfig, action: ClientAction | None) -> BlendConfig:
    """The server's blend settings with the request's own overrides applied.

    A per-request ratio without a per-request schedule replaces the server's gradual schedule
    (one ending elsewhere would contradict it); a per-request schedule sets the check layer (its
    first layer) and, unless given too, the ratio (its last). Raises ``ValueError`` naming the
    field for a combination ``BlendConfig`` rejects.
    """
    if action is None or not action.overrides_blend:
        return server
    changes: dict[str, object] = {}
    if action.selector is not None:
        changes["selector"] = action.selector
    if action.gradual is not None:
        steps = action.gradual
        changes["gradual"] = steps
        if steps:
            changes["check_layer"] = steps[0][0]
            changes["recompute_ratio"] = steps[-1][1]
    elif action.recompute_ratio is not None:
        changes["gradual"] = ()
    if action.recompute_ratio is not None:
        changes["recompute_ratio"] = action.recompute_ratio
    if action.recompute_window is not None:
        changes["recompute_window"] = action.recompute_window
    return dataclasses.replace(server, **changes)


def check_fits_model(config: BlendConfig, num_layers: int, *, what: str) -> None:
    """``ValueError`` naming ``what`` if a selection layer of ``config`` is not a layer of a
    ``num_layers``-layer model."""
    last = config.schedule[-1][0]
    if last >= num_layers:
        raise ValueError(
            f"{what}: selection layer {last} is not a layer of the served model "
            f"({num_layers} layers, numbered 0..{num_layers - 1})"
        )
