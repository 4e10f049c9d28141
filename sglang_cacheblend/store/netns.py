"""Run Mooncake only inside a private network namespace.

Mooncake's transfer engine listens on ``0.0.0.0`` (random ports) whatever address it is given,
and refuses to start when loopback is the only interface ("no valid LAN address"). So every
Mooncake process of ours runs in a network namespace of its own (``unshare -n``, root only):
``lo`` is brought up and one virtual link, which exists only in that namespace, satisfies the
LAN check. Nothing Mooncake opens there can be reached from the machine's own network.

The link is a ``dummy`` interface ``cb0``; where the kernel has no dummy driver it is a veth
pair ``cb0``/``cb0p`` with both ends in the namespace. :func:`in_private_netns` is the check a
service runs before it starts anything.
"""

from __future__ import annotations

import ctypes.util
import importlib.util
import json
import os
import shutil
import subprocess

__all__ = ["in_private_netns", "mooncake_available", "private_netns_command"]

LINK = "cb0"  # the namespace's only interface besides lo
LINK_PEER = "cb0p"  # the veth peer, when the dummy driver is missing
LINK_ADDR = "10.203.0.1/24"  # never routed anywhere: the link has no other end outside

# `sh -c` prelude: brings the links up, then runs $1.. as its child. The shell is PID 1 of
# the namespace's PID namespace: it passes TERM/INT/HUP on (PID 1 itself would ignore them
# without a handler) and exits with the command's status, taking every process left with it.
_PRELUDE = f"""set -e
ip link set lo up
if ! ip link add {LINK} type dummy 2>/dev/null; then
  ip link add {LINK} type veth peer name {LINK_PEER}
  ip link set {LINK_PEER} up
fi
ip addr add {LINK_ADDR} dev {LINK}
ip link set {LINK} up
export MC_TCP_BIND_ADDRESS=127.0.0.1
set +e
child=
trap 'kill -TERM "$child" 2>/dev/null' TERM INT HUP
exec 3<&0
"$@" <&3 3<&- &
child=$!
exec 3<&-
while :; do
  wait "$child"
  status=$?
  kill -0 "$child" 2>/dev/null || exit "$status"
done
"""


def private_netns_command(argv: list[str]) -> list[str]:
    """``argv`` wrapped to run in a new network namespace with ``lo`` and :data:`LINK` up.

    The command sees only that namespace (``MC_TCP_BIND_ADDRESS=127.0.0.1`` set) and its
    children inherit it. It also runs in a new PID namespace (with its own ``/proc``, in a mount
    namespace of its own), so every process in there dies
    with the command, or when ``unshare`` is killed (``--kill-child``), and no Mooncake
    process outlives it. The exit status is the command's. Needs root (see
    :func:`mooncake_available`). The result is an argv list for :mod:`subprocess`.

    Stopping it: ``Popen.kill()`` or a ``subprocess`` timeout ends the whole tree at once. For
    a graceful stop start it with ``start_new_session=True`` and send SIGTERM to its process
    group (``os.killpg(proc.pid, signal.SIGTERM)``): ``unshare`` (util-linux 2.38) blocks
    SIGTERM itself while it waits, so ``Popen.terminate()`` alone does nothing.
    """
    if not argv:
        raise ValueError("argv must name a command")
    # --mount-proc: a /proc of the new PID namespace, or tools reading /proc/self by PID (psutil,
    # which SGLang's launcher uses) look up the wrong process.
    return ["unshare", "--net", "--pid", "--mount-proc", "--kill-child", "--", "sh", "-c",
            _PRELUDE, "sh", *argv]


def mooncake_available() -> str | None:
    """None if Mooncake can run here in a private namespace, else why not."""
    if os.geteuid() != 0:
        return "a private network namespace (unshare -n) needs root"
    for tool in ("unshare", "ip"):
        if shutil.which(tool) is None:
            return f"`{tool}` is not installed (util-linux / iproute2)"
    for module in ("mooncake", "mooncake.store"):
        try:
            found = importlib.util.find_spec(module) is not None
        except Exception:  # noqa: BLE001 - a broken install is "missing" too
            found = False
        if not found:
            return ("the Mooncake Python package is missing: "
                    "pip install 'mooncake-transfer-engine-non-cuda==0.3.13.post1'")
    if ctypes.util.find_library("ibverbs") is None:
        return "libibverbs.so.1 is missing (needed even for TCP): apt-get install -y libibverbs1"
    return None


def in_private_netns() -> str | None:
    """None if this process is in a namespace :func:`private_netns_command` made, else why not.

    The check: every network interface visible here (``ip -j -d link``, which reads the
    current namespace, unlike ``/sys/class/net``) is either the loopback ``lo`` or one of
    :data:`LINK`/:data:`LINK_PEER` of kind ``dummy`` or ``veth`` whose other end is in this
    same namespace (a veth whose peer lives elsewhere carries ``link_netnsid``). Such a
    namespace has no path to any other network, so nothing listening in it, on any address,
    can be reached from outside. The machine's own network (``eth0`` etc.) fails the check.
    """
    try:
        out = subprocess.run(["ip", "-j", "-d", "link", "show"], capture_output=True,
                             text=True, timeout=10, check=True).stdout
        links = json.loads(out)
    except (OSError, subprocess.SubprocessError, ValueError) as exc:
        return f"cannot list network interfaces ({exc})"
    for link in links:
        name = link.get("ifname")
        if name == "lo" and link.get("link_type") == "loopback":
            continue
        kind = (link.get("linkinfo") or {}).get("info_kind")
        if name not in (LINK, LINK_PEER) or kind not in ("dummy", "veth"):
            return (f"interface {name!r} (kind {kind!r}) is visible: this is not a private "
                    f"namespace from private_netns_command")
        if "link_netnsid" in link:
            return f"interface {name!r} has its other end in another namespace"
    return None
