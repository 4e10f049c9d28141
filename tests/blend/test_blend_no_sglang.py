"""The pure algorithm package and BlendConfig import with ``sglang`` blocked."""

from __future__ import annotations

import subprocess
import sys
import textwrap

BLOCKED_IMPORT = textwrap.dedent(
    """
    import importlib, pkgutil, sys

    class BlockSglang:
        def find_spec(self, name, path=None, target=None):
            if name == "sglang" or name.startswith("sglang."):
                raise ImportError(f"blocked import of {name}")
            return None

    sys.meta_path.insert(0, BlockSglang())
    try:
        import sglang  # noqa: F401
    except ImportError:
        pass
    else:
        raise SystemExit("the blocker did not block sglang")

    import sglang_cacheblend.blend as blend
    import sglang_cacheblend.config as config

    for info in pkgutil.walk_packages(blend.__path__, prefix="sglang_cacheblend.blend."):
        importlib.import_module(info.name)
    config.BlendConfig.linear(0.3, 0.15, 1, 8)
    leaked = sorted(m for m in sys.modules if m == "sglang" or m.startswith("sglang."))
    assert not leaked, leaked
    print("ok", len(blend.__all__))
    """
)


def test_blend_and_config_import_without_sglang():
    done = subprocess.run(
        [sys.executable, "-c", BLOCKED_IMPORT],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("ok")
