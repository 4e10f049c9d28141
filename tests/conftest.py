"""Shared fixtures: the embedded model, and one SGLang server for the whole test session.

The server is started lazily (only if a test asks for it), bound to 127.0.0.1, with CacheBlend
enabled, and killed with its whole process group at the end of the session.
"""

from __future__ import annotations

import contextlib
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


# Non-default values, so a test can tell that the flags really reached the scheduler.
SERVER_BLEND_ARGS = ["--enable-cacheblend", "--cacheblend-recompute-ratio", "0.2"]


STANDALONE_CHUNKS = ["--cacheblend-chunk-context", "none"]
"""Chunk KV computed after the sink only: what tests that compare the server with standalone
chunk KV (offline blends, exact token accounting) were written for. ``running_server`` adds
it unless a test names its own chunk context or asks for the defaults."""


@contextlib.contextmanager
def running_server(model_path: Path, log_dir: Path, args: list[str], *,
                   defaults: bool = False) -> Iterator:
    """A server of ``model_path`` on a free loopback port; its log's tail is printed if it
    fails to start. Chunk KV is standalone (:data:`STANDALONE_CHUNKS`) unless ``args`` set a
    chunk context or ``defaults`` keeps the server's default (context-conditioned) one."""
    from sglang_cacheblend.launch import ServerProcess

    if "--enable-cacheblend" in args and not defaults and STANDALONE_CHUNKS[0] not in args:
        args = [*args, *STANDALONE_CHUNKS]
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
    with running_server(model_path, tmp_path_factory.mktemp("server"), SERVER_BLEND_ARGS) as proc:
        yield proc
