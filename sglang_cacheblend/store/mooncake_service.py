"""A private Mooncake Store on loopback: metadata server, master and one memory-holding client.

Start it only inside a namespace made by :func:`~.netns.private_netns_command` (it refuses
otherwise, see :func:`~.netns.in_private_netns`): Mooncake's transfer engine listens on
``0.0.0.0`` whatever it is told. Every address it is given is ``127.0.0.1``, on free ports:

==========================  ==========================================================
process                     listens on (inside the namespace)
==========================  ==========================================================
``mooncake.http_metadata``  ``127.0.0.1:<metadata port>`` (the Python server; the
``_server``                 master's built-in one is off: it binds ``0.0.0.0``)
``mooncake_master``         ``127.0.0.1:<rpc port>``, metrics ``127.0.0.1:<metrics port>``
``mooncake_client``         ``127.0.0.1:<client port>``; its transfer engine on random
                            ports of ``0.0.0.0``/``::``; holds ``global_segment_bytes``
==========================  ==========================================================

The long-lived client holds the store's memory, so the processes that use the store
(:class:`~.mooncake_tier.MooncakeTier`, e.g. in two SGLang servers) contribute none and can
come and go without their memory lingering at the master (puts would fail with -800 until the
master's client TTL expires).

``python -m sglang_cacheblend.store.mooncake_service --check`` runs a self-test (as root: it
enters a private namespace itself).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

from sglang_cacheblend.store.netns import (
    in_private_netns,
    mooncake_available,
    private_netns_command,
)

__all__ = ["MooncakeService"]

_HOST = "127.0.0.1"


def _free_ports(n: int) -> list[int]:
    """``n`` distinct free TCP ports of 127.0.0.1 (held open together while chosen)."""
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind((_HOST, 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def _binary(name: str) -> str:
    """Path of a native Mooncake executable shipped inside the ``mooncake`` package."""
    spec = importlib.util.find_spec("mooncake")
    if spec is None or spec.origin is None:
        raise RuntimeError(mooncake_available() or "the mooncake package is missing")
    path = Path(spec.origin).parent / name
    if not os.access(path, os.X_OK):
        path.chmod(path.stat().st_mode | 0o111)
    return str(path)


def _http_status(url: str) -> int | None:
    """The HTTP status of a GET of ``url``, or None if nothing answers."""
    try:
        with urllib.request.urlopen(url, timeout=1) as resp:
            return resp.status
    except urllib.error.HTTPError as exc:
        return exc.code
    except (OSError, ValueError):
        return None


class MooncakeService:
    """Context manager running a loopback Mooncake Store inside a private namespace.

    ``global_segment_bytes`` is the store's memory (held by the long-lived client);
    ``lease_ttl_ms`` how long an object stays pinned after a put or get (a remove fails with
    -706 meanwhile); ``startup_timeout_s`` bounds the wait for all three to be ready.
    ``master_addr`` and ``metadata_url`` are what :class:`~.mooncake_tier.MooncakeTier` takes.
    Processes are stopped (terminate, then kill after 5 s) on exit, also after a failed start.
    """

    def __init__(self, *, global_segment_bytes: int = 256 << 20, lease_ttl_ms: int = 5000,
                 startup_timeout_s: float = 30.0) -> None:
        if global_segment_bytes < 1 << 20:
            raise ValueError(f"global_segment_bytes must be >= 1 MiB, got {global_segment_bytes}")
        self._segment = global_segment_bytes
        self._lease_ttl_ms = lease_ttl_ms
        self._timeout = startup_timeout_s
        self._procs: dict[str, subprocess.Popen] = {}
        self._logs: tempfile.TemporaryDirectory | None = None
        self.master_addr = self.metadata_url = self.metrics_url = ""  # set on entry

    def __enter__(self) -> MooncakeService:
        reason = in_private_netns()
        if reason is not None:
            raise RuntimeError(f"refusing to start Mooncake outside a private network "
                               f"namespace ({reason}); run under private_netns_command()")
        self._ports = _free_ports(4)  # chosen inside the namespace only
        meta_port, rpc_port, metrics_port, _ = self._ports
        self.master_addr = f"{_HOST}:{rpc_port}"
        self.metadata_url = f"http://{_HOST}:{meta_port}/metadata"
        self.metrics_url = f"http://{_HOST}:{metrics_port}/metrics"
        self._logs = tempfile.TemporaryDirectory(prefix="cacheblend-mooncake-")
        try:
            self._start()
        except BaseException:
            self.__exit__(None, None, None)
            raise
        return self

    def _spawn(self, name: str, argv: list[str]) -> None:
        env = {**os.environ, "MC_TCP_BIND_ADDRESS": _HOST}
        env.pop("MC_LEGACY_RPC_PORT_BINDING", None)
        log = open(Path(self._logs.name) / f"{name}.log", "wb")  # noqa: SIM115 - child owns it
        with log:
            self._procs[name] = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log,
                                                 stderr=subprocess.STDOUT, env=env)

    def _start(self) -> None:
        meta_port, rpc_port, metrics_port, client_port = self._ports
        deadline = time.monotonic() + self._timeout
        self._spawn("metadata", [sys.executable, "-m", "mooncake.http_metadata_server",
                                 "--host", _HOST, "--port", str(meta_port),
                                 "--log-level", "WARNING"])
        self._spawn("master", [_binary("mooncake_master"), f"--rpc_address={_HOST}",
                               f"--rpc_port={rpc_port}", f"--metrics_host={_HOST}",
                               f"--metrics_port={metrics_port}",
                               "--enable_http_metadata_server=false",
                               f"--default_kv_lease_ttl={self._lease_ttl_ms}", "--logtostderr"])
        # The metadata server answers 404 for an unknown key once it is up.
        self._wait(lambda: _http_status(f"{self.metadata_url}?key=probe") == 404,
                   "the metadata server", deadline)
        self._wait(lambda: _http_status(self.metrics_url) == 200, "the master", deadline)
        self._spawn("client", [_binary("mooncake_client"), f"--host={_HOST}",
                               f"--port={client_port}", f"--global_segment_size={self._segment}",
                               f"--master_server_address={self.master_addr}",
                               f"--metadata_server={self.metadata_url}", "--protocol=tcp",
                               "--logtostderr"])
        self._wait(lambda: self.capacity_bytes() >= self._segment,
                   "the client's segment to be mounted", deadline)

    def _wait(self, ready, what: str, deadline: float) -> None:
        while not ready():
            dead = [name for name, p in self._procs.items() if p.poll() is not None]
            if dead or time.monotonic() > deadline:
                why = f"{', '.join(dead)} exited" if dead else f"{self._timeout:.0f} s passed"
                raise RuntimeError(f"Mooncake did not start: waiting for {what}, {why}\n"
                                   f"{self.log_tail()}")
            time.sleep(0.05)

    def capacity_bytes(self) -> int:
        """Store memory the master has mounted (0 if it does not answer)."""
        try:
            with urllib.request.urlopen(self.metrics_url, timeout=1) as resp:
                text = resp.read().decode()
        except (OSError, ValueError):
            return 0
        for line in text.splitlines():
            if line.startswith("master_total_capacity_bytes "):
                return int(float(line.split()[1]))
        return 0

    def kill_master(self) -> None:
        """Kill the master (SIGKILL) to test how clients degrade; the rest keeps running."""
        proc = self._procs["master"]
        proc.kill()
        proc.wait(timeout=10)

    def log_tail(self, lines: int = 15) -> str:
        """The last ``lines`` of each process's log, for error messages."""
        if self._logs is None:
            return ""
        out = []
        for path in sorted(Path(self._logs.name).glob("*.log")):
            tail = path.read_text(errors="replace").splitlines()[-lines:]
            out.append(f"--- {path.stem} ---\n" + "\n".join(tail))
        return "\n".join(out)

    def __exit__(self, *exc_info) -> None:
        for name in ("client", "master", "metadata"):
            proc = self._procs.pop(name, None)
            if proc is None or proc.poll() is not None:
                continue
            proc.terminate()
            try:
                proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=5)
        if self._logs is not None:
            self._logs.cleanup()
            self._logs = None


def _self_test() -> dict:
    """Start a service, put and get one ~23 MB chunk through a MooncakeTier, report timings."""
    import torch

    from sglang_cacheblend.store.entry import ChunkKV
    from sglang_cacheblend.store.mooncake_tier import MooncakeTier

    gen = torch.Generator().manual_seed(0)
    shape = (30, 512, 3, 64)
    kv = ChunkKV(torch.randn(shape, generator=gen), torch.randn(shape, generator=gen),
                 torch.arange(512), torch.randint(0, 32000, (512,), generator=gen))
    started = time.perf_counter()
    with MooncakeService() as service:
        start_s = time.perf_counter() - started
        tier = MooncakeTier(service.master_addr, service.metadata_url)
        key = "ab" * 32
        t0 = time.perf_counter()
        tier.put(key, kv)
        t1 = time.perf_counter()
        got = tier.get(key)
        t2 = time.perf_counter()
        ok = got is not None and all(torch.equal(getattr(got, f), getattr(kv, f))
                                     for f in ("k", "v", "positions", "token_ids"))
        tier.close()
    return {"ok": ok, "chunk_mb": round(kv.nbytes / 1e6, 1), "start_s": round(start_s, 2),
            "put_ms": round((t1 - t0) * 1e3, 1), "get_ms": round((t2 - t1) * 1e3, 1)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", required=True,
                        help="start a private store, put and get one chunk, print JSON")
    parser.add_argument("--inside", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if not args.inside:
        reason = mooncake_available()
        if reason is not None:
            print(json.dumps({"ok": False, "error": reason}))
            return 1
        cmd = private_netns_command([sys.executable, "-m", __spec__.name, "--check",
                                     "--inside"])
        return subprocess.run(cmd, check=False, timeout=120).returncode
    result = _self_test()
    print(json.dumps(result))
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
