"""Mooncake tier scenarios, run inside a private network namespace by test_mooncake_tier.py.

``python mooncake_scenarios.py SCENARIO`` (under ``private_netns_command``) starts a
:class:`MooncakeService`, runs the scenario and prints one line ``RESULT {json}``. Scenarios
that need other processes run this file again with a helper name (``_put``, ``_get``,
``_raw_put``); the children inherit the namespace. Every wait is bounded.
"""

from __future__ import annotations

import ipaddress
import json
import logging
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

SHAPE = (30, 512, 3, 64)  # layers, tokens, kv heads, head dim: K and V fp32, ~23.6 MB
KEY = "c0ffee" * 10 + "abcd"
CHILD_TIMEOUT_S = 60


def make_kv(seed: int, shape: tuple[int, ...] = SHAPE):
    import torch

    from sglang_cacheblend.store.entry import ChunkKV

    gen = torch.Generator().manual_seed(seed)
    n = shape[1]
    return ChunkKV(torch.randn(shape, generator=gen), torch.randn(shape, generator=gen),
                   torch.arange(100, 100 + n), torch.randint(0, 49152, (n,), generator=gen))


def identical(a, b) -> bool:
    import torch

    return all(torch.equal(getattr(a, f), getattr(b, f)) and getattr(a, f).dtype
               == getattr(b, f).dtype for f in ("k", "v", "positions", "token_ids"))


def namespace_report() -> dict:
    """The interfaces and listening TCP sockets this namespace has (from /proc/self/net)."""
    interfaces = [line.split(":")[0].strip()
                  for line in Path("/proc/self/net/dev").read_text().splitlines()[2:]]
    listeners = []
    for proto in ("tcp", "tcp6"):
        for line in Path(f"/proc/self/net/{proto}").read_text().splitlines()[1:]:
            fields = line.split()
            if fields[3] != "0A":  # TCP_LISTEN
                continue
            addr_hex, port_hex = fields[1].split(":")
            raw = bytes.fromhex(addr_hex)
            # /proc prints each 32-bit word in host (little-endian) order.
            addr = ipaddress.ip_address(b"".join(raw[i:i + 4][::-1] for i in range(0, len(raw), 4)))
            listeners.append(f"{addr}:{int(port_hex, 16)}")
    return {"interfaces": interfaces, "listeners": listeners}


class WarningCounter(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


def watch_tier_warnings() -> WarningCounter:
    counter = WarningCounter()
    logging.getLogger("sglang_cacheblend.store.mooncake_tier").addHandler(counter)
    return counter


def start_child(*args: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, __file__, *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def finish_child(proc: subprocess.Popen) -> dict:
    try:
        stdout, stderr = proc.communicate(timeout=CHILD_TIMEOUT_S)
    finally:
        proc.kill()
    return parse_result(subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr))


def parse_result(out: subprocess.CompletedProcess) -> dict:
    for line in out.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[len("RESULT "):])
    raise RuntimeError(f"child {out.args[2:]} rc={out.returncode} printed no RESULT:\n"
                       f"{out.stdout[-2000:]}\n{out.stderr[-3000:]}")


def tier_for(master_addr: str, metadata_url: str, **kw):
    from sglang_cacheblend.store.mooncake_tier import MooncakeTier

    return MooncakeTier(master_addr, metadata_url, **kw)


# --- helpers run as separate processes ----------------------------------------------------------

def wait_for(path: str, timeout_s: float = 30.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not Path(path).exists():
        if time.monotonic() > deadline:
            raise TimeoutError(f"{path} did not appear within {timeout_s} s")
        time.sleep(0.002)


def child_put(master_addr: str, metadata_url: str, seed: str, go: str = "") -> dict:
    """Put make_kv(seed) under KEY; after ``go`` appears if given (a start barrier; this
    child touches ``go.ready<pid>`` when it is set up)."""
    kv = make_kv(int(seed))
    tier = tier_for(master_addr, metadata_url)
    if go:
        Path(f"{go}.ready{os.getpid()}").touch()
        wait_for(go)
    start = time.time()
    tier.put(KEY, kv)
    end = time.time()
    stats = tier.stats()
    tier.close()
    return {"start": start, "end": end, "put_ms": (end - start) * 1e3, "stats": vars(stats)}


def child_get(master_addr: str, metadata_url: str, seed: str) -> dict:
    """Get KEY (twice: cold and warm) and compare it with make_kv(seed)."""
    expected = make_kv(int(seed))
    tier = tier_for(master_addr, metadata_url)
    t0 = time.perf_counter()
    got = tier.get(KEY)
    get_ms = (time.perf_counter() - t0) * 1e3
    t0 = time.perf_counter()
    tier.get(KEY)
    warm_get_ms = (time.perf_counter() - t0) * 1e3
    stats = tier.stats()
    tier.close()
    return {"hit": got is not None, "identical": got is not None and identical(got, expected),
            "get_ms": get_ms, "warm_get_ms": warm_get_ms, "stats": vars(stats)}


def child_raw_put(master_addr: str, metadata_url: str, spec_file: str) -> dict:
    """Store raw bytes under Mooncake names, bypassing the tier: {name: hex bytes} in a file."""
    from mooncake.store import MooncakeDistributedStore

    store = MooncakeDistributedStore()
    code = store.setup("127.0.0.1", metadata_url, 0, 64 << 20, "tcp", "", master_addr)
    if code != 0:
        raise RuntimeError(f"setup returned {code}")
    entries = json.loads(Path(spec_file).read_text())
    codes = {name: store.put(name, bytes.fromhex(data)) for name, data in entries.items()}
    store.close()
    return {"codes": codes}


# --- scenarios ---------------------------------------------------------------------------------

def scenario_share(service, tmp: Path) -> dict:
    """(a) Process A (a child) puts a chunk; this process, B, gets it back bit-identical."""
    a = finish_child(start_child("_put", service.master_addr, service.metadata_url, "1"))
    b = child_get(service.master_addr, service.metadata_url, "1")
    return {"put": a, "get": b, "namespace": namespace_report()}


def scenario_concurrent(service, tmp: Path) -> dict:
    """(b) Two processes put one key at the same moment; a later get is valid and correct."""
    go = tmp / "go"
    procs = [start_child("_put", service.master_addr, service.metadata_url, "2", str(go))
             for _ in range(2)]
    deadline = time.monotonic() + CHILD_TIMEOUT_S
    while len(list(tmp.glob("go.ready*"))) < 2 and time.monotonic() < deadline:
        if any(p.poll() is not None for p in procs):
            break
        time.sleep(0.01)
    go.touch()
    results = [finish_child(p) for p in procs]
    tier = tier_for(service.master_addr, service.metadata_url)
    got = tier.get(KEY)
    correct = got is not None and identical(got, make_kv(2))
    overlap = max(r["start"] for r in results) < min(r["end"] for r in results)
    reads = reads_during_writes(tier)
    stats = tier.stats()
    tier.close()
    return {"puts": results, "overlap": overlap, "correct": correct, "reads": reads,
            "stats": vars(stats)}


def reads_during_writes(tier) -> dict:
    """One thread puts three ~23 MB chunks while this one gets a small chunk over and over:
    gets finish while a put is in flight (they do not queue behind it)."""
    small = make_kv(6, (2, 16, 2, 8))
    tier.put("5a" * 32, small)
    big = make_kv(7)
    spans: list[tuple[float, float]] = []

    def writer() -> None:
        for i in range(3):
            t0 = time.perf_counter()
            tier.put(f"{i + 0xb0:02x}" * 32, big)
            spans.append((t0, time.perf_counter()))

    thread = threading.Thread(target=writer)
    thread.start()
    gets = []
    while thread.is_alive():
        t0 = time.perf_counter()
        hit = tier.get("5a" * 32) is not None
        gets.append((t0, time.perf_counter(), hit))
    thread.join()
    inside = [g for g in gets if any(a < g[0] and g[1] < b for a, b in spans)]
    return {"gets": len(gets), "hits": sum(g[2] for g in gets), "inside_a_put": len(inside),
            "max_get_ms": max((g[1] - g[0]) * 1e3 for g in gets),
            "put_ms": [(b - a) * 1e3 for a, b in spans]}


def scenario_master_killed(service) -> dict:
    """(c) The master dies: every call returns within timeout_s + 1 s, one warning, and no
    raise but a put's NotStored (the store counts it)."""
    from sglang_cacheblend.store.tier import NotStored

    timeout_s = 2.0
    warnings = watch_tier_warnings()
    tier = tier_for(service.master_addr, service.metadata_url, timeout_s=timeout_s, retry_s=1.0)
    small = make_kv(3, (2, 16, 2, 8))
    tier.put("aa", small)
    before = tier.get("aa") is not None
    service.kill_master()
    calls = []
    for what in ("get", "put", "get", "put", "remove", "sleep", "get", "put"):
        if what == "sleep":
            time.sleep(1.2)  # past retry_s: the next call tries the master again
            continue
        t0 = time.perf_counter()
        try:
            if what == "get":
                result = tier.get("aa") is not None
            elif what == "put":
                try:
                    result = tier.put("bb", small)
                except NotStored:
                    result = "not stored"
            else:
                result = tier.remove("aa")
            error = None
        except Exception as exc:  # noqa: BLE001 - the scenario reports it
            result, error = None, repr(exc)
        calls.append({"call": what, "s": time.perf_counter() - t0, "result": result,
                      "error": error})
    stats = tier.stats()
    tier.close()
    return {"timeout_s": timeout_s, "hit_before": before, "calls": calls,
            "warnings": warnings.messages, "stats": vars(stats)}


def scenario_damaged(service, tmp: Path) -> dict:
    """(d) Damaged bytes stored under tier keys are detected on get, dropped, then replaced."""
    from sglang_cacheblend.store.codec import encode
    from sglang_cacheblend.store.mooncake_tier import KEY_PREFIX

    kv = make_kv(4, (2, 16, 2, 8))
    flipped = bytearray(encode("aa", kv))
    flipped[-5] ^= 0xFF  # inside the last tensor's data
    truncated = encode("bb", kv)
    damaged = {"aa": bytes(flipped), "bb": truncated[: len(truncated) // 2],
               "cc": encode("aa", kv),  # another key's entry, misfiled
               "dd": b"not a safetensors blob", "ee": encode("ee", kv, version="0")}
    spec = tmp / "raw.json"
    spec.write_text(json.dumps({KEY_PREFIX + k: v.hex() for k, v in damaged.items()}))
    raw = finish_child(start_child("_raw_put", service.master_addr, service.metadata_url,
                                   str(spec)))
    warnings = watch_tier_warnings()
    tier = tier_for(service.master_addr, service.metadata_url)
    gets = {key: tier.get(key) is None for key in damaged}
    dropped = tier.stats().dropped
    tier.put("aa", kv)  # the recomputed chunk replaces the damaged entry
    repaired = tier.get("aa")
    stats = tier.stats()
    tier.close()
    return {"raw": raw, "missed": gets, "dropped_after_gets": dropped,
            "repaired": repaired is not None and identical(repaired, kv),
            "warnings": warnings.messages, "stats": vars(stats)}


def scenario_bench(service) -> dict:
    """Timings of one ~23 MB chunk through the tier (not a test: for the docs)."""
    from sglang_cacheblend.store.codec import decode, encode

    kv = make_kv(5)
    tier = tier_for(service.master_addr, service.metadata_url)
    out: dict[str, list[float]] = {"encode_ms": [], "decode_ms": [], "put_ms": [],
                                   "put_existing_ms": [], "get_ms": []}
    for i in range(5):
        key = f"{i:02x}" * 32
        t0 = time.perf_counter()
        data = encode(key, kv)
        t1 = time.perf_counter()
        decode(key, data)
        t2 = time.perf_counter()
        tier.put(key, kv)
        t3 = time.perf_counter()
        tier.put(key, kv)
        t4 = time.perf_counter()
        assert tier.get(key) is not None
        t5 = time.perf_counter()
        for name, value in zip(out, (t1 - t0, t2 - t1, t3 - t2, t4 - t3, t5 - t4)):
            out[name].append(round(value * 1e3, 1))
    out["mb"] = round(len(data) / 1e6, 2)
    out["stats"] = vars(tier.stats())
    tier.close()
    return out


def main() -> int:
    name, args = sys.argv[1], sys.argv[2:]
    logging.basicConfig(level=logging.INFO, stream=sys.stderr)
    children = {"_put": child_put, "_raw_put": child_raw_put}
    if name in children:
        print("RESULT " + json.dumps(children[name](*args)), flush=True)
        return 0
    import tempfile

    from sglang_cacheblend.store.mooncake_service import MooncakeService

    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp, MooncakeService() as service:
        started_s = time.perf_counter() - t0
        scenarios = {"share": lambda: scenario_share(service, Path(tmp)),
                     "concurrent": lambda: scenario_concurrent(service, Path(tmp)),
                     "master_killed": lambda: scenario_master_killed(service),
                     "damaged": lambda: scenario_damaged(service, Path(tmp)),
                     "bench": lambda: scenario_bench(service)}
        result = scenarios[name]()
        result["service_start_s"] = started_s
        result["namespace_end"] = namespace_report()
        print("RESULT " + json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
