"""The tier benchmark with Mooncake as well: ``sglang-cacheblend bench --tiers ... mooncake``
run inside a private network namespace with its own Mooncake service.

Mooncake's transfer engine listens on every interface, so it (and the servers using it) must not
run on the machine's network (:mod:`sglang_cacheblend.store.netns`). This script re-runs itself
under ``private_netns_command`` (root needed), starts :class:`MooncakeService` there and runs the
benchmark command with the Mooncake flags; every other argument goes to ``bench``::

    python benchmarks/bench_tiers_mooncake.py --reps 3 --name bench_tiers

writes ``docs/results/bench_tiers.{json,csv,md,png}`` (pool, host, disk and Mooncake, with and
without layer pipelining).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from sglang_cacheblend.store.netns import (
    in_private_netns,
    mooncake_available,
    private_netns_command,
)

REPO_ROOT = Path(__file__).resolve().parents[1]


def main(argv: list[str]) -> int:
    if in_private_netns() is not None:
        reason = mooncake_available()
        if reason is not None:
            print(f"bench_tiers_mooncake: {reason}", file=sys.stderr)
            return 2
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(
            [str(REPO_ROOT), os.environ.get("PYTHONPATH", "")]))
        return subprocess.run(private_netns_command([sys.executable, __file__, *argv]),
                              env=env, check=False).returncode
    from sglang_cacheblend.store.mooncake_service import MooncakeService

    import shlex

    from sglang_cacheblend import cli

    with MooncakeService(global_segment_bytes=6 << 30) as service:
        parser = cli.build_parser()
        bench_argv = ["bench", "--tiers", "host", "disk", "mooncake", *argv,
                      "--cacheblend-mooncake-master", service.master_addr,
                      "--cacheblend-mooncake-metadata", service.metadata_url]
        args, server_args = parser.parse_known_args(bench_argv)
        args.command_line = shlex.join(["python", "benchmarks/bench_tiers_mooncake.py", *argv])
        return cli._cmd_bench(args, server_args)


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
