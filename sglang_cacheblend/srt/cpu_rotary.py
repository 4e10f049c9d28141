"""SGLang's rotary embedding on a device that is neither CUDA nor SGLang's CPU engine.

There, ``RotaryEmbedding.__init__`` imports ``vllm._custom_ops.rotary_embedding`` (a kernel
that is not installed), although ``forward`` then dispatches to ``forward_native`` anyway. The
AROUND hook here satisfies that one import for the duration of ``__init__`` with a stand-in
that raises if called, and puts the module back on its native torch path. Active only where
asked for: with ``--enable-cacheblend``, or under ``sglang-cacheblend serve`` on CPU
(:data:`~sglang_cacheblend.options.NATIVE_ROTARY_ENV_VAR`); an installed vLLM is never shadowed.
"""

from __future__ import annotations

import contextlib
import os
import sys
import types
from collections.abc import Callable, Iterator
from typing import Any

from sglang_cacheblend.options import NATIVE_ROTARY_ENV_VAR, current_options

__all__ = ["native_rotary_init"]

_VLLM_OPS = "vllm._custom_ops"


def _missing_vllm_rotary(*args: Any, **kwargs: Any) -> None:
    raise RuntimeError("vllm rotary kernel is not installed; RotaryEmbedding must stay native")


@contextlib.contextmanager
def _vllm_rotary_stand_in() -> Iterator[None]:
    """Make ``from vllm._custom_ops import rotary_embedding`` succeed for one call."""
    try:
        import vllm._custom_ops  # noqa: F401

        yield
        return
    except ImportError:
        pass
    added = {}
    for name in ("vllm", _VLLM_OPS):
        if name not in sys.modules:
            module = types.ModuleType(name)
            module.__path__ = []  # a package, so the submodule import resolves
            added[name] = module
    added[_VLLM_OPS].rotary_embedding = _missing_vllm_rotary
    sys.modules.update(added)
    try:
        yield
    finally:
        for name in added:
            sys.modules.pop(name, None)


def native_rotary_init(original_init: Callable[..., None], self: Any, *args: Any, **kw: Any):
    """AROUND ``RotaryEmbedding.__init__``: see the module docstring."""
    if not (current_options().enabled or os.environ.get(NATIVE_ROTARY_ENV_VAR) == "1"):
        original_init(self, *args, **kw)
        return
    with _vllm_rotary_stand_in():
        original_init(self, *args, **kw)
    if getattr(self, "fallback_rotary_embedding", None) is _missing_vllm_rotary:
        # Only where __init__ took the stand-in: other devices keep the kernel they chose.
        self.use_fallback_kernel = False
        self.fallback_rotary_embedding = None
