"""A request's effective settings: the server's, with the request's own overrides.

The overrides are the rows of :data:`sglang_cacheblend.options.REQUEST_SETTINGS` a request gave
(``ClientAction.settings``). Computed once, in the tokenizer process, where ``BlendConfig``
checks the result and the served model is known, so a bad or unrunnable setting is an HTTP 400
for that request and never an exception inside the scheduler's forward. Imports no SGLang.
"""

from __future__ import annotations

import dataclasses

from sglang_cacheblend.chunks import ClientAction
from sglang_cacheblend.config import BlendConfig
from sglang_cacheblend.options import REQUEST_SETTINGS

__all__ = ["effective_config", "effective_ratio_policy"]


def effective_config(server: BlendConfig, action: ClientAction | None) -> BlendConfig:
    """The server's blend settings with the request's own overrides applied.

    A per-request ratio without a per-request schedule replaces the server's gradual schedule
    (one ending elsewhere would contradict it); a per-request schedule sets the check layer (its
    first layer) and, unless given too, the ratio (its last). Raises ``ValueError`` naming the
    field for a value or combination ``BlendConfig`` rejects.
    """
    changes = {row.name: action.settings[row.name] for row in REQUEST_SETTINGS
               if row.part == "blend" and action is not None and row.name in action.settings}
    if not changes:
        return server
    steps = changes.get("gradual")
    if steps:
        changes.setdefault("recompute_ratio", steps[-1][1])
        changes["check_layer"] = steps[0][0]
    elif steps is None and "recompute_ratio" in changes:
        changes["gradual"] = ()
    return dataclasses.replace(server, **changes)


def effective_ratio_policy(server: str, action: ClientAction | None) -> str:
    """The request's own ``ratio_policy``; else "fixed" when it sets its own ratio or schedule
    (an explicit ratio wins over the server's controller); else the server's."""
    settings = {} if action is None else action.settings
    if "ratio_policy" in settings:
        return settings["ratio_policy"]
    if "recompute_ratio" in settings or "gradual" in settings:
        return "fixed"
    return server
