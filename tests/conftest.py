"""Shared fixtures: the embedded model, and the SGLang servers tests share.

``server`` runs the shipped defaults (``--enable-cacheblend`` and nothing else): the chunk
context, ratio, selector and dtype a user gets from ``sglang-cacheblend serve``, bf16 on a CPU
that multiplies bf16 natively. ``standalone_server`` is for the tests that need the paper's
standalone chunk KV in exact arithmetic (see :data:`STANDALONE_SERVER_ARGS`). Each is started
lazily (only if a test asks for it), bound to 127.0.0.1, and killed with its whole process
group at the end of the session.

Every test that starts a server carries the ``server`` marker
(:func:`pytest_collection_modifyitems`), so ``pytest -m "not server"`` is the fast loop of pure
tests.
"""

from __future__ import annotations

import contextlib
import re
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="session")
def model_path() -> Path:
    from sglang_cacheblend.embedded_model import ensure_model

    return ensure_model()


SHIPPED_BLEND_ARGS = ["--enable-cacheblend"]
"""CacheBlend with every default it ships with: what the session ``server`` runs."""

FLOAT32 = ["--dtype", "float32"]
"""Exact arithmetic. ``serve`` picks bf16 on a CPU with native bf16 (``launch.cpu_dtype``),
where one rounding more or less (another batch shape, a prefix hit) moves a log-prob by ~0.1
and can flip a greedy token: a test that claims two ways of computing the same KV give the
same answer pins fp32."""

STANDALONE_CHUNKS = ["--cacheblend-chunk-context", "none"]
"""Chunk KV computed after the sink only (the paper's standalone chunk KV), not after the
shipped chunk context."""

NON_DEFAULT_RATIO = 0.2

STANDALONE_SERVER_ARGS = [*SHIPPED_BLEND_ARGS, *STANDALONE_CHUNKS, *FLOAT32,
                          "--cacheblend-recompute-ratio", str(NON_DEFAULT_RATIO)]
"""``standalone_server``: standalone chunk KV in fp32, for tests that compare the server with
standalone chunk KV or count its tokens exactly; the ratio is not the default, so a test can
tell that the flags really reached the scheduler."""


@contextlib.contextmanager
def running_server(model_path: Path, log_dir: Path, args: list[str]) -> Iterator:
    """A server of ``model_path`` with exactly ``args`` (and ``serve``'s defaults for the rest)
    on a free loopback port; its log's tail is printed if it fails to start."""
    from sglang_cacheblend.launch import ServerProcess

    log_path = log_dir / "sglang.log"
    proc = ServerProcess(args=args, port=free_port(), model_path=model_path, log_path=log_path)
    try:
        proc.start()
    except Exception:
        print(log_path.read_text()[-5000:])
        raise
    try:
        yield proc
    finally:
        proc.stop()


@pytest.fixture(scope="session")
def server(model_path: Path, tmp_path_factory: pytest.TempPathFactory):
    with running_server(model_path, tmp_path_factory.mktemp("server"), SHIPPED_BLEND_ARGS) as proc:
        yield proc


@pytest.fixture(scope="session")
def standalone_server(model_path: Path, tmp_path_factory: pytest.TempPathFactory):
    with running_server(model_path, tmp_path_factory.mktemp("standalone_server"),
                        STANDALONE_SERVER_ARGS) as proc:
        yield proc


# How a test module starts a server: by file name (``test_*_server.py``, ``test_*_servers.py``),
# by calling a starter, or through a fixture named ``*server`` (``server``, ``plain_server``...).
_SERVER_MODULE = re.compile(r"_servers?\.py$")
_SERVER_STARTERS = re.compile(r"\brunning_server\(|\bServerProcess\(|sglang\.launch_server")


def _starts_a_server(item: pytest.Item, module_starts: dict[Path, bool]) -> bool:
    path = Path(str(item.path))
    if path not in module_starts:
        module_starts[path] = bool(_SERVER_MODULE.search(path.name)
                                   or _SERVER_STARTERS.search(path.read_text()))
    return module_starts[path] or any(name.endswith("server") for name in item.fixturenames)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Mark every test that starts an SGLang server (or needs one started) ``server``."""
    module_starts: dict[Path, bool] = {}
    for item in items:
        if _starts_a_server(item, module_starts):
            item.add_marker(pytest.mark.server)
