"""Results files: every number written together with what produced it.

These machines are noisy and the code changes daily, so a figure without its configuration,
commit and machine cannot be compared with anything. :func:`write_results` writes

* ``<name>.json``: ``{"name", "config", "provenance", "summary", "rows"}``, the whole record;
* ``<name>.csv``: the per-row records (one row per request/measurement), for spreadsheets;

and :func:`load_results` reads the JSON back. ``provenance`` holds the date (UTC, ISO 8601), the
git commit and whether the work tree was dirty, and the machine (CPU model, core count, RAM,
Python/torch/sglang versions, load average).
"""

from __future__ import annotations

import csv
import json
import os
import platform
import subprocess
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[2]


@dataclass(frozen=True)
class Results:
    """A results file as loaded: configuration, provenance, summary and per-row records."""

    name: str
    config: dict[str, Any]
    provenance: dict[str, Any]
    summary: dict[str, Any] = field(default_factory=dict)
    rows: list[dict[str, Any]] = field(default_factory=list)


@dataclass(frozen=True)
class ResultsPaths:
    json: Path
    csv: Path


def git_state(repo: Path | str = REPO_ROOT) -> dict[str, Any]:
    """``{"commit": full hash or None, "dirty": bool or None}`` of the checkout at ``repo``.

    ``dirty`` counts tracked changes and untracked files that git does not ignore. None when
    ``repo`` is not a git checkout or git is missing.
    """
    def git(*args: str) -> str | None:
        try:
            done = subprocess.run(
                ["git", *args], cwd=repo, capture_output=True, text=True, timeout=30, check=False
            )
        except (OSError, subprocess.SubprocessError):
            return None
        return done.stdout if done.returncode == 0 else None

    commit = git("rev-parse", "HEAD")
    status = git("status", "--porcelain")
    return {
        "commit": commit.strip() if commit else None,
        "dirty": None if status is None else bool(status.strip()),
    }


def machine_info() -> dict[str, Any]:
    """CPU model, core count, RAM, OS and library versions of this machine (no imports)."""
    return {
        "cpu_model": _cpu_model(),
        "cpu_cores": os.cpu_count(),
        "ram_bytes": _ram_bytes(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": _version("torch"),
        "sglang": _version("sglang"),
        "sglang_cacheblend": _version("sglang-cacheblend"),
        "load_avg": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
    }


def provenance(repo: Path | str = REPO_ROOT) -> dict[str, Any]:
    """Date, git state and machine: what :func:`write_results` records unless given one."""
    return {
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "git": git_state(repo),
        "machine": machine_info(),
    }


def write_results(
    out_dir: Path | str,
    name: str,
    *,
    config: Mapping[str, Any],
    rows: Sequence[Mapping[str, Any]],
    summary: Mapping[str, Any] | None = None,
    provenance_info: Mapping[str, Any] | None = None,
) -> ResultsPaths:
    """Write ``<out_dir>/<name>.json`` and ``<out_dir>/<name>.csv``; return their paths.

    ``config`` should hold everything needed to rerun (the command line included); ``rows`` are
    flat records (nested values are written to the CSV as JSON); ``provenance_info`` defaults to
    :func:`provenance` taken now. Creates ``out_dir``; overwrites both files.
    """
    if not name or "/" in name:
        raise ValueError(f"name must be a plain file stem, got {name!r}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    record = {
        "name": name,
        "config": dict(config),
        "provenance": dict(provenance_info) if provenance_info is not None else provenance(),
        "summary": dict(summary or {}),
        "rows": [dict(row) for row in rows],
    }
    paths = ResultsPaths(out / f"{name}.json", out / f"{name}.csv")
    paths.json.write_text(json.dumps(record, indent=2, default=str) + "\n")
    _write_csv(paths.csv, record["rows"])
    return paths


def load_results(path: Path | str) -> Results:
    """Read a results JSON written by :func:`write_results`; ``ValueError`` if it is not one."""
    path = Path(path)
    record = json.loads(path.read_text())
    if not isinstance(record, dict):
        raise ValueError(f"{path}: not a results file (expected a JSON object)")
    missing = [key for key in ("name", "config", "provenance", "rows") if key not in record]
    if missing:
        raise ValueError(f"{path}: not a results file (missing {', '.join(missing)})")
    return Results(
        name=record["name"],
        config=record["config"],
        provenance=record["provenance"],
        summary=record.get("summary", {}),
        rows=record["rows"],
    )


def _write_csv(path: Path, rows: Sequence[dict[str, Any]]) -> None:
    columns: dict[str, None] = {}
    for row in rows:
        columns.update(dict.fromkeys(row))
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(columns))
        writer.writeheader()
        for row in rows:
            writer.writerow({k: _cell(v) for k, v in row.items()})


def _cell(value: Any) -> Any:
    return json.dumps(value) if isinstance(value, (dict, list, tuple)) else value


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _ram_bytes() -> int | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def _version(package: str) -> str | None:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None
