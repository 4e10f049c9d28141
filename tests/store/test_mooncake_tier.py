"""Mooncake Store tier: chunks shared between processes, safe concurrent writers, a dead master
that never stalls or crashes the caller, damaged entries dropped; plus the codec it stores.

Mooncake never runs on this machine's network: each scenario test runs
``mooncake_scenarios.py`` under :func:`private_netns_command` (a new network namespace with
only ``lo`` and a virtual link that has no end outside it), and the scenario starts the master,
metadata server and clients there. The pytest process stays outside. Scenario tests need root
(skipped otherwise, as CI runs as root) and FAIL if Mooncake cannot run.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from sglang_cacheblend.store import ChunkKV
from sglang_cacheblend.store.codec import decode, encode
from sglang_cacheblend.store.mooncake_service import MooncakeService
from sglang_cacheblend.store.mooncake_tier import MooncakeTier
from sglang_cacheblend.store.netns import (
    LINK,
    LINK_PEER,
    in_private_netns,
    mooncake_available,
    private_netns_command,
)

SCRIPT = Path(__file__).with_name("mooncake_scenarios.py")
REPO_ROOT = Path(__file__).resolve().parents[2]
ALLOWED_LISTEN = {"127.0.0.1", "0.0.0.0", "::"}  # 0.0.0.0/:: only inside the namespace


def run_scenario(name: str, timeout_s: float = 75) -> dict:
    if os.geteuid() != 0:
        pytest.skip("Mooncake runs only in a private network namespace (unshare -n): needs root")
    reason = mooncake_available()
    assert reason is None, f"Mooncake cannot run here: {reason}"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        [str(REPO_ROOT), os.environ.get("PYTHONPATH", "")]))
    out = subprocess.run(private_netns_command([sys.executable, str(SCRIPT), name]),
                         check=False, capture_output=True, text=True, timeout=timeout_s,
                         env=env)
    results = [line for line in out.stdout.splitlines() if line.startswith("RESULT ")]
    assert out.returncode == 0 and results, (
        f"scenario {name} rc={out.returncode}\n{out.stdout[-3000:]}\n{out.stderr[-5000:]}")
    result = json.loads(results[-1][len("RESULT "):])
    assert_private(result["namespace_end"])
    return result


def assert_private(report: dict) -> None:
    """Only lo and the namespace's own link exist; sockets listen on loopback or on the
    namespace's wildcard (reachable from nowhere else, as no interface leads out)."""
    assert set(report["interfaces"]) <= {"lo", LINK, LINK_PEER}, report
    assert "lo" in report["interfaces"] and report["listeners"], report
    for listener in report["listeners"]:
        assert listener.rpartition(":")[0] in ALLOWED_LISTEN, report


def make_kv(seed: int = 0, shape: tuple[int, ...] = (3, 7, 2, 4),
            dtype: torch.dtype = torch.bfloat16) -> ChunkKV:
    gen = torch.Generator().manual_seed(seed)
    return ChunkKV(torch.randn(shape, generator=gen).to(dtype),
                   torch.randn(shape, generator=gen).to(dtype), torch.arange(shape[1]),
                   torch.randint(0, 1000, (shape[1],), generator=gen))


# --- pure parts: no Mooncake needed -------------------------------------------------------------

def test_codec_round_trips_bit_identical():
    kv = make_kv(dtype=torch.bfloat16)
    got = decode("ab", encode("ab", kv))
    for field in ("k", "v", "positions", "token_ids"):
        assert torch.equal(getattr(got, field), getattr(kv, field))
        assert getattr(got, field).dtype == getattr(kv, field).dtype


@pytest.mark.parametrize("damage, message", [
    ("truncated header", "truncated"), ("truncated data", "truncated or unreadable"),
    ("flipped byte", "checksum"), ("other key", "stored under key"),
    ("foreign version", "version '0'"), ("garbage", "truncated|unreadable")])
def test_codec_names_what_is_wrong(damage, message):
    kv = make_kv()
    data = encode("cd" if damage == "other key" else "ab", kv,
                  version="0" if damage == "foreign version" else "1")
    if damage == "truncated header":
        data = data[:20]
    elif damage == "truncated data":
        data = data[:-10]
    elif damage == "flipped byte":
        data = data[:-3] + bytes([data[-3] ^ 0xFF]) + data[-2:]
    elif damage == "garbage":
        data = b"\xff" * 64
    with pytest.raises(ValueError, match=message):
        decode("ab", data)


@pytest.mark.parametrize("kwargs, message", [
    ({"master_addr": "10.0.0.5:50051"}, "master_addr"),
    ({"master_addr": "0.0.0.0:50051"}, "master_addr"),
    ({"master_addr": "127.0.0.1"}, "host:port"),
    ({"master_addr": "127.0.0.1:0"}, "port"),
    ({"metadata_url": "http://192.168.1.2:8080/metadata"}, "metadata_url"),
    ({"metadata_url": "P2PHANDSHAKE"}, "http://"),
    ({"local_host": "0.0.0.0"}, "local_host"),
])
def test_tier_refuses_any_address_but_loopback(kwargs, message):
    args = {"master_addr": "127.0.0.1:50051", "metadata_url": "http://127.0.0.1:8080/metadata"}
    args.update(kwargs)
    local = {"local_host": args.pop("local_host")} if "local_host" in args else {}
    with pytest.raises(ValueError, match=message):
        MooncakeTier(args["master_addr"], args["metadata_url"], **local)


def test_nothing_starts_on_this_machines_own_network():
    reason = in_private_netns()
    if reason is None:
        pytest.skip("this machine's own network has no interface but lo")
    with pytest.raises(RuntimeError, match="private network namespace"):
        MooncakeTier("127.0.0.1:50051", "http://127.0.0.1:8080/metadata")
    with pytest.raises(RuntimeError, match="refusing to start"):
        MooncakeService().__enter__()


def test_private_netns_command_wraps_argv():
    cmd = private_netns_command(["python", "x.py", "a b"])
    assert cmd[0] == "unshare" and {"--net", "--pid", "--kill-child"} <= set(cmd)
    assert cmd[-3:] == ["python", "x.py", "a b"]
    prelude = cmd[cmd.index("-c") + 1]
    assert "MC_TCP_BIND_ADDRESS=127.0.0.1" in prelude and f"dev {LINK}" in prelude


# --- scenarios, inside a private namespace ------------------------------------------------------

def test_a_chunk_put_by_one_process_is_read_bit_identical_by_another():
    result = run_scenario("share")
    assert result["put"]["stats"]["stored"] == 1 and result["put"]["stats"]["failures"] == 0
    get = result["get"]
    assert get["hit"] and get["identical"], get
    assert get["stats"]["hits"] == 2 and get["stats"]["dropped"] == 0
    assert_private(result["namespace"])


def test_concurrent_writers_of_one_chunk_are_safe_and_reads_do_not_wait_for_writes():
    result = run_scenario("concurrent")
    for put in result["puts"]:
        assert put["stats"]["failures"] == 0 and put["stats"]["stored"] == 1, put
    assert result["correct"], result
    reads = result["reads"]  # and a reader never queues behind a writer
    assert reads["hits"] == reads["gets"] and reads["inside_a_put"] >= 1, reads
    assert result["stats"]["dropped"] == 0 and result["stats"]["failures"] == 0


def test_a_dead_master_never_blocks_or_crashes_the_caller():
    result = run_scenario("master_killed")
    assert result["hit_before"]
    limit = result["timeout_s"] + 1
    for call in result["calls"]:
        assert call["error"] is None and call["s"] < limit, call
        assert call["result"] in (False, "not stored"), call  # a miss, a put declined, no removal
    assert any(call["s"] > 1 for call in result["calls"]), "no call hit the timeout path"
    assert len(result["warnings"]) == 1 and "unavailable" in result["warnings"][0]
    stats = result["stats"]
    assert not stats["available"] and stats["failures"] >= 1 and stats["skipped"] >= 1


def test_damaged_entries_are_dropped_not_served_and_then_replaced():
    result = run_scenario("damaged")
    assert all(code == 0 for code in result["raw"]["codes"].values()), result["raw"]
    assert all(result["missed"].values()) and result["dropped_after_gets"] == 5
    reasons = " | ".join(result["warnings"])
    for why in ("checksum mismatch", "truncated or unreadable", "stored under key 'aa'",
                "truncated: header", "version '0'"):
        assert why in reasons, reasons
    assert result["repaired"], "a put of the recomputed chunk must replace the damaged entry"
    assert result["stats"]["failures"] == 0
