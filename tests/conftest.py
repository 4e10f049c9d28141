"""Shared fixtures: the embedded model, and one SGLang server for the whole test session.

The server is started lazily (only if a test asks for it), bound to 127.0.0.1, with CacheBlend
enabled, and killed with its whole process group at the end of the session.
"""

from __future__ import annotations

import socket
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


@pytest.fixture(scope="session")
def server(model_path: Path, tmp_path_factory: pytest.TempPathFactory):
    from sglang_cacheblend.launch import ServerProcess

    log_path = tmp_path_factory.mktemp("server") / "sglang.log"
    proc = ServerProcess(
        args=SERVER_BLEND_ARGS, port=free_port(), model_path=model_path, log_path=log_path
    )
    try:
        proc.start()
    except Exception:
        print(log_path.read_text()[-5000:])
        raise
    yield proc
    proc.stop()
