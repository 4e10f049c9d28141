"""Run a snippet in a fresh interpreter where every ``sglang`` import raises.

The pure packages (``sglang_cacheblend.blend``, ``radix_ext``) must never import SGLang; a
subprocess is the only clean way to check it, since the test process may already hold SGLang.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]

_BLOCKER = textwrap.dedent(
    """
    import importlib.abc, sys

    class BlockSglang(importlib.abc.MetaPathFinder):
        def find_spec(self, fullname, path, target=None):
            if fullname == "sglang" or fullname.startswith("sglang."):
                raise ImportError(f"blocked import of {fullname}")
            return None

    sys.meta_path.insert(0, BlockSglang())
    try:
        import sglang  # noqa: F401
    except ImportError:
        pass
    else:
        raise SystemExit("the blocker did not block sglang")
    """
)

_NO_LEAK = textwrap.dedent(
    """
    leaked = sorted(m for m in sys.modules if m.split(".")[0] == "sglang")
    assert not leaked, leaked
    print("ok")
    """
)


def run_without_sglang(snippet: str) -> None:
    """Run ``snippet`` with sglang blocked; fail the test unless it ends with no sglang loaded."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        [str(REPO_ROOT), os.environ.get("PYTHONPATH", "")]))
    result = subprocess.run(
        [sys.executable, "-c", _BLOCKER + textwrap.dedent(snippet) + _NO_LEAK],
        cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().endswith("ok"), result.stdout
