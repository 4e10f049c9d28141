"""Two SGLang servers share chunk KV through Mooncake Store, inside a private network namespace.

Mooncake's transfer engine listens on every interface, so neither it nor the servers using it
run on this machine's network: the whole scenario (``mooncake_two_servers.py``) runs under
:func:`~sglang_cacheblend.store.netns.private_netns_command`, where only ``lo`` and a link
with no end outside exist, and every address is 127.0.0.1. Needs root (CI runs as root).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from sglang_cacheblend.store.netns import mooncake_available, private_netns_command

SCRIPT = Path(__file__).with_name("mooncake_two_servers.py")
REPO_ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def result(model_path, tmp_path_factory) -> dict:
    if os.geteuid() != 0:
        pytest.skip("Mooncake runs only in a private network namespace (unshare -n): needs root")
    reason = mooncake_available()
    assert reason is None, f"Mooncake cannot run here: {reason}"
    logs = tmp_path_factory.mktemp("mooncake_servers")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        [str(REPO_ROOT), os.environ.get("PYTHONPATH", "")]))
    out = subprocess.run(
        private_netns_command([sys.executable, str(SCRIPT), str(model_path), str(logs)]),
        capture_output=True, text=True, timeout=1200, env=env, check=False)
    lines = [line for line in out.stdout.splitlines() if line.startswith("RESULT ")]
    if out.returncode != 0 or not lines:
        for log in sorted(logs.rglob("sglang.log")):
            print(log, log.read_text()[-3000:])
    assert out.returncode == 0 and lines, (out.returncode, out.stdout[-3000:], out.stderr[-5000:])
    return json.loads(lines[-1].removeprefix("RESULT "))


def test_a_chunk_computed_on_one_server_is_reused_by_another(result):
    assert result["a_report"]["chunk_sources"]["pool"] == 4
    assert result["b_report"]["chunk_sources"].get("mooncake") == 4, result["b_report"]
    assert result["b_report"]["chunk_hits"] == 0  # B's pool never held them
    assert result["b_output"] == result["a_output"]


def test_concurrent_writers_of_one_chunk_are_safe(result):
    assert result["b2_report"]["chunk_sources"].get("mooncake") == 3, result["b2_report"]
    assert result["b2_output"] == result["a2_output"]
    assert result["b_tier_after_writers"]["dropped"] == 0


def test_the_master_going_away_degrades_to_local_compute(result):
    report = result["b3_report"]
    assert report["blended"] is True and report["chunk_sources"]["computed"] == 3, report
    assert result["b_health"] == 200 and result["b_leak_free"]
    tier = result["b_tier_after_master"]
    assert tier["available"] is False and tier["failures"] >= 1
    assert result["dead_master_s"] < 120
