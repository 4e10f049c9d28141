"""The short version of ``sglang-cacheblend soak`` (the full run's figures: docs/reliability.md).

A small pool (it evicts all the time), three clients that share, reorder, miss and repeat
chunks, aborts and hang-ups mixed in; bounded in requests and seconds. The server must not die,
every completed answer must equal the same request served alone, and nothing may leak.
"""

from __future__ import annotations

import pytest

from sglang_cacheblend.eval.soak import SoakConfig, run_soak
from sglang_cacheblend.launch import ServerProcess
from tests.conftest import free_port


@pytest.fixture(scope="module")
def soak_server(model_path, tmp_path_factory):
    log_path = tmp_path_factory.mktemp("soak") / "sglang.log"
    proc = ServerProcess(args=["--enable-cacheblend", "--max-total-tokens", "4000"],
                         port=free_port(), model_path=model_path, log_path=log_path)
    try:
        proc.start()
    except Exception:
        print(log_path.read_text()[-5000:])
        raise
    yield proc
    proc.stop()


def test_short_soak_keeps_serving_answers_alike_and_leaks_nothing(soak_server):
    report = run_soak(soak_server.base_url, SoakConfig(requests=18, duration_s=400, clients=3,
                                                       prompts=6, seed=1))
    print(report)
    assert soak_server.is_running() and report.server_deaths == 0
    assert report.errors == [] and report.leaks == []
    assert report.mismatches == []
    assert report.served > 0 and report.blended > 0
    assert report.sent == 18
    assert report.chunk_evictions > 0, "the pool never evicted: not a soak under pressure"
