"""radix_ext must import, and work, with every `sglang` import blocked."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]

SCRIPT = textwrap.dedent(
    """
    import importlib.abc
    import sys

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

    import torch
    import radix_ext
    import radix_ext.base, radix_ext.chunk_index, radix_ext.entry, radix_ext.keys  # noqa: E401

    class Pool:
        def free(self, kv_loc):
            self.freed = kv_loc.tolist()

    pool = Pool()
    index = radix_ext.ChunkIndex(pool)
    namespace = radix_ext.ChunkNamespace("m")
    index.insert(namespace, [1, 2], torch.tensor([5, 6]), 0)
    assert index.match(namespace, [0, 1, 2], [(1, 3)])[0].hit
    index.clear()
    assert pool.freed == [5, 6]
    assert not [name for name in sys.modules if name.split(".")[0] == "sglang"]
    print("ok")
    """
)


def test_radix_ext_imports_without_sglang():
    env = dict(
        os.environ, PYTHONPATH=os.pathsep.join([str(REPO_ROOT), os.environ.get("PYTHONPATH", "")])
    )
    result = subprocess.run(
        [sys.executable, "-c", SCRIPT],
        cwd=REPO_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "ok"
