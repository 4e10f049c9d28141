"""``sglang-cacheblend bench --tiers``: TTFT with every chunk in the pool, host RAM, disk, Mooncake.

One server per loading mode (layer-pipelined, and ``--cacheblend-no-pipeline``), each with a
small pool, a host-RAM tier and a disk tier (and Mooncake when its flags are given: run the
command inside a private network namespace, see :mod:`sglang_cacheblend.store.netns`). Each
repetition, on one server and in this order:

* ``full``: the prompt prefilled by SGLang, nothing cached (after ``/flush_cache``);
* other chunks precomputed until the pool is full of them, then the prompt's passages
  precomputed (written through to disk/Mooncake; writes are always waited for, so they never
  overlap a measurement);
* ``pool``: blended, every chunk in the pool; the pool is full, so the request evicts other
  chunks to fit (which spill to host RAM), as the ``host`` request does: the two differ only by
  where their own chunks come from;
* ``host``: other chunks precomputed until the pool has evicted the prompt's chunks (they spill
  to host RAM), then blended: every chunk loaded from host RAM (evicting, and spilling, others);
* ``disk``: ``/flush_cache`` (the pool is emptied; host RAM gave its copies back to the pool),
  then blended: every chunk read from disk, its checksum verified;
* ``mooncake``: the disk files removed and the pool flushed, then blended from Mooncake.

Mooncake's transfer engine listens on every interface, so it (and the servers using it) must
not run on the machine's network (:mod:`sglang_cacheblend.store.netns`). ``--tiers ... mooncake``
without the ``--cacheblend-mooncake-*`` server flags re-runs the same command inside a private
network namespace (root needed) with a Mooncake service of its own::

    sglang-cacheblend bench --tiers host disk mooncake --reps 3 --name bench_tiers

Each blended request uses another order of the passages (so no request is a prefix of another)
and must report every chunk served by the tier it measures, or the run stops. A tier's TTFT is
reported as a ratio to full prefill on the same server, and to the pool-resident TTFT. Writes
``<out>/<name>.{json,csv,md}`` and ``<out>/<name>.png``.
"""

from __future__ import annotations

import argparse
import random
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import requests
from tqdm import tqdm

from sglang_cacheblend.chunks import ChunkedPrompt, precompute_hints
from sglang_cacheblend.chunks.client import wait_for_store_writes
from sglang_cacheblend.eval.bench.load import Client
from sglang_cacheblend.eval.bench.workload import make_workload, shape_label

POOL_TOKENS = 8000
TIERS = ("pool", "host", "disk", "mooncake")


class TierClient(Client):
    """The benchmark's client (requests, flush, server state), plus a batched precompute of
    token-id chunks that waits for their tier writes."""

    def precompute_ids(self, chunks: Sequence[list[int]], salt: str, batch: int = 4) -> None:
        """Precompute token-id chunks, ``batch`` per request, then wait for their writes."""
        for i in range(0, len(chunks), batch):
            part = list(chunks[i:i + batch])
            response = requests.post(self.url + "/generate", json={
                "input_ids": part, "cache_salt": [salt] * len(part),
                "sampling_params": {"max_new_tokens": 0}, "kv_hints": precompute_hints()},
                timeout=self.timeout_s)
            if response.status_code != 200:
                raise RuntimeError(f"precompute failed ({response.status_code}): "
                                   f"{response.text}")
        wait_for_store_writes(self.url)  # writes must never overlap a measurement


def build_prompt(passages: Sequence[list[int]], order: Sequence[int], head: list[int],
                 question: list[int]) -> ChunkedPrompt:
    """``head``, the passages in ``order`` (each one chunk), then ``question``."""
    ids, spans = list(head), []
    for i in order:
        spans.append((len(ids), len(ids) + len(passages[i])))
        ids += passages[i]
    return ChunkedPrompt(tuple(ids + question), tuple(spans))


def run_server(client: TierClient, passages: list[list[int]], head: list[int],
               question: list[int], tiers: Sequence[str], disk_dir: Path, *, reps: int,
               ratio: float, seed: int, bar: tqdm | None, label: str) -> list[dict[str, Any]]:
    """Every repetition of full and each tier on one server (module docstring)."""
    rng = random.Random(seed)
    n = len(passages)
    rows: list[dict[str, Any]] = []
    filler_len = len(passages[0])
    for rep in range(-1, reps):  # rep -1 warms every path up and is not recorded
        client.flush()
        ordered = build_prompt(passages, range(n), head, question)
        full = client.generate(ordered, uuid.uuid4().hex)
        rows.append({"server": label, "rep": rep, "mode": "full", "ttft_s": full.latency_s,
                     "prompt_tokens": len(ordered.input_ids)})
        def fill_pool() -> None:  # other chunks, until the pool has evicted everything older
            fillers = [[rng.randrange(1000, 30000) for _ in range(filler_len)]
                       for _ in range(POOL_TOKENS // filler_len + 1)]
            client.precompute_ids(fillers, uuid.uuid4().hex)

        fill_pool()  # a full pool: the pool and host requests both evict (and spill) to fit
        salt = uuid.uuid4().hex
        client.precompute_ids(passages, salt)
        for tier in tiers:
            if tier == "host":
                fill_pool()
            elif tier in ("disk", "mooncake"):
                if tier == "mooncake":
                    for path in disk_dir.glob("*.safetensors"):
                        path.unlink()
                client.flush()
            prompt = build_prompt(passages, rng.sample(range(n), n), head, question)
            reply = client.generate(prompt, salt, ratio)
            report = reply.blend_report
            sources = (report or {}).get("chunk_sources", {})
            if not report or not report.get("blended") or sources.get(tier) != n:
                raise RuntimeError(f"{label} {tier}: expected all {n} chunks from {tier}, got "
                                   f"{report}")
            rows.append({"server": label, "rep": rep, "mode": tier, "ttft_s": reply.latency_s,
                         "prompt_tokens": len(prompt.input_ids), "load_s": report.get("load_s"),
                         "load_wait_s": report.get("load_wait_s"),
                         "store_read_s": report.get("store_read_s", 0.0),
                         "recomputed_rows": report.get("recomputed_rows")})
        if bar is not None:
            bar.update()
    return [row for row in rows if row["rep"] >= 0]


def summarize(rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Median TTFT per (server, mode), as ratios to full prefill and to pool on that server."""
    out = []
    for server in dict.fromkeys(r["server"] for r in rows):
        mine = [r for r in rows if r["server"] == server]
        medians = {mode: statistics.median(r["ttft_s"] for r in mine if r["mode"] == mode)
                   for mode in dict.fromkeys(r["mode"] for r in mine)}
        for mode, median in medians.items():
            out.append({"server": server, "mode": mode, "median_ttft_s": round(median, 4),
                        "speedup_vs_full": round(medians["full"] / median, 3),
                        "vs_pool": round(median / medians["pool"], 3),
                        "reps": sum(r["mode"] == mode for r in mine)})
    return out


def plot(summary: Sequence[dict[str, Any]], out_path: Path) -> Path:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    servers = list(dict.fromkeys(r["server"] for r in summary))
    modes = list(dict.fromkeys(r["mode"] for r in summary))
    fig = Figure(figsize=(7.5, 4.2))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    width = 0.8 / len(servers)
    for i, server in enumerate(servers):
        values = {r["mode"]: r["median_ttft_s"] for r in summary if r["server"] == server}
        xs = [m + (i - (len(servers) - 1) / 2) * width for m in range(len(modes))]
        ax.bar(xs, [values.get(mode, 0.0) for mode in modes], width, label=server)
    ax.set_xticks(range(len(modes)), modes)
    ax.set_ylabel("median TTFT (s)")
    ax.set_title("TTFT by where the chunk KV sits (6 chunks; full = SGLang's prefill)")
    ax.legend()
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    out_path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out_path, dpi=120)
    return out_path


def markdown(config: dict[str, Any], info: dict[str, Any], summary: Sequence[dict[str, Any]],
             png: str) -> str:
    lines = [
        "# TTFT by chunk tier (pool, host RAM, disk, Mooncake)", "",
        f"Command: `{config['command_line']}`  ",
        f"Commit {info['git'].get('commit', '?')[:10]} (dirty: {info['git'].get('dirty')}), "
        f"{info['machine'].get('cpu_cores')} CPUs, {info['date']}; wall {config['wall_s']:.0f} s."
        "", "",
        f"Prompt {shape_label(config['chunks'], config['chunk_size'])} of item {config['item']}, "
        f"recompute ratio {config['ratio']}, {config['reps']} repetitions (medians); pool "
        f"{POOL_TOKENS} tokens. Every blended request reported all its chunks served by the "
        "tier of its row.", "",
        "| server | mode | median TTFT (s) | speedup vs full | TTFT / pool-resident |",
        "|---|---|---|---|---|",
    ]
    for r in summary:
        lines.append(f"| {r['server']} | {r['mode']} | {r['median_ttft_s']:.3f} | "
                     f"{r['speedup_vs_full']:.2f}x | {r['vs_pool']:.3f} |")
    lines += ["", f"![TTFT by tier]({png})", ""]
    return "\n".join(lines)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--tiers", nargs="+", choices=TIERS, default=None,
                        help="run the tier benchmark on these tiers instead (pool is always "
                             "included). mooncake: the service of the --cacheblend-mooncake-* "
                             "server flags, or without them a service of its own in a private "
                             "network namespace (root)")
    parser.add_argument("--tier-pipelining", nargs="+", choices=("on", "off"),
                        default=["on", "off"], help="tier benchmark: loading modes to measure")


def run(args: argparse.Namespace, server_args: Sequence[str]) -> dict[str, Path]:
    """The tier benchmark (``--tiers``): self-started servers, one per loading mode; with
    ``mooncake`` and no Mooncake server flags, in a private namespace with its own service."""
    if args.url:
        raise ValueError("--tiers starts its own servers (it needs their tier flags): drop --url")
    wants_mooncake = "--cacheblend-mooncake-master" in server_args
    if "mooncake" in args.tiers and not wants_mooncake:
        return _run_with_own_mooncake(args, server_args)
    if wants_mooncake and "mooncake" not in args.tiers:
        raise ValueError("the --cacheblend-mooncake-* server flags need --tiers ... mooncake")
    return _run_tiers(args, server_args)


def _run_with_own_mooncake(args: argparse.Namespace,
                           server_args: Sequence[str]) -> dict[str, Path]:
    """Outside a private network namespace: this same command again inside one (its files are
    listed by that run; nothing is returned here). Inside: a Mooncake service, then the run."""
    from sglang_cacheblend.store.netns import (
        in_private_netns,
        mooncake_available,
        private_netns_command,
    )

    if in_private_netns() is not None:
        reason = mooncake_available()
        if reason is not None:
            raise ValueError(f"--tiers mooncake: {reason}")
        command = private_netns_command([sys.executable, "-m", "sglang_cacheblend.cli",
                                         *args.argv])
        status = subprocess.run(command, check=False).returncode
        if status != 0:
            raise RuntimeError(f"the run in the private network namespace failed (exit {status})")
        return {}
    from sglang_cacheblend.store.mooncake_service import MooncakeService

    with MooncakeService(global_segment_bytes=6 << 30) as service:
        return _run_tiers(args, [*server_args,
                                 "--cacheblend-mooncake-master", service.master_addr,
                                 "--cacheblend-mooncake-metadata", service.metadata_url])


def _run_tiers(args: argparse.Namespace, server_args: Sequence[str]) -> dict[str, Path]:
    from transformers import AutoTokenizer

    from sglang_cacheblend.dataset import load_items
    from sglang_cacheblend.embedded_model import ensure_model
    from sglang_cacheblend.eval.results import provenance, write_results
    from sglang_cacheblend.launch import ServerProcess

    tiers = ["pool", *[t for t in args.tiers if t != "pool"]]
    chunks = args.load_chunks
    size = None if args.whole_passages else args.load_chunk_size
    model_path = args.model_path or ensure_model(getattr(args, "cache_dir", None))
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    work = make_workload(load_items(args.data), args.item, chunks, size, tokenizer)
    ids, spans = list(work.ordered.input_ids), list(work.ordered.spans)
    passages = [ids[s:e] for s, e in spans]
    head, question = ids[:spans[0][0]], ids[spans[-1][1]:]
    ratio = args.ratios[0]
    started = time.monotonic()
    rows: list[dict[str, Any]] = []
    with tqdm(total=len(args.tier_pipelining) * (args.reps + 1), desc="tier bench",
              unit="rep") as bar:
        for mode in args.tier_pipelining:
            label = "pipelined" if mode == "on" else "not pipelined"
            with tempfile.TemporaryDirectory(prefix="cacheblend-bench-disk-") as disk:
                flags = ["--enable-cacheblend", "--max-total-tokens", str(POOL_TOKENS),
                         "--cacheblend-host-tier-mb", "8192", "--cacheblend-disk-tier-dir", disk,
                         "--cacheblend-disk-tier-mb", "8192",
                         "--cacheblend-min-reused-tokens", "16", *server_args]
                if mode == "off":
                    flags.append("--cacheblend-no-pipeline")
                log_path = Path(tempfile.gettempdir()) / f"sglang-cacheblend-{args.name}-{mode}.log"
                with ServerProcess(args=flags, port=args.port, model_path=Path(model_path),
                                   log_path=log_path) as proc:
                    rows += run_server(TierClient(proc.base_url), passages, head, question,
                                       tiers, Path(disk), reps=args.reps, ratio=ratio,
                                       seed=args.seed, bar=bar, label=label)
    summary = summarize(rows)
    config = {"command_line": args.command_line, "item": args.item,
              "server_args": list(server_args), "model_path": str(model_path),
              "chunks": chunks, "chunk_size": size, "ratio": ratio, "reps": args.reps,
              "tiers": tiers, "pipelining": args.tier_pipelining,
              "wall_s": time.monotonic() - started}
    info = provenance()
    paths = write_results(args.out, args.name, config=config, rows=rows,
                          summary={"ttft": summary}, provenance_info=info)
    png = plot(summary, Path(args.out) / f"{args.name}.png")
    md = Path(args.out) / f"{args.name}.md"
    md.write_text(markdown(config, info, summary, png.name))
    return {"json": paths.json, "csv": paths.csv, "md": md, "png": png}
