"""The resumable ingest state: which chunks are in the server already.

A JSONL file: a header line, then one record per precomputed chunk, appended, flushed and
fsynced after each finished batch, so an interruption loses at most the batch in flight. A
record is keyed by :func:`ingest_key`, a digest of everything that decides which KV the server
stores for a chunk text: the text, the model, ``cache_salt``, ``extra_key``, and what the chunk
was computed after (the server's chunk context, or the context family that replaces it).

A last line cut off mid-write (no valid JSON) is dropped when the file is opened, and cut from
the file before anything is appended. Any other damaged line, or a file that does not open with
the header, raises ``ValueError``: a state file is never guessed at, nor is a file that is not
one written to.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from pathlib import Path

__all__ = ["HEADER", "IngestState", "StateRecord", "default_state_path", "ingest_key"]

HEADER = json.dumps({"format": "sglang-cacheblend-ingest-state", "version": 1})


def ingest_key(text: str, *, model: str, cache_salt: str | None = None,
               extra_key: str | None = None, chunk_context: str = "",
               family: str | None = None) -> str:
    """A stable digest of (chunk text, model identity, cache_salt, extra_key, and what the
    chunk's KV is computed after): the context ``family`` if any, else the server's
    ``chunk_context`` text if any. The same text after another context is other KV, which a
    server with that other context does not hold. Without either, the key is the one state
    files written before contexts existed hold."""
    fields: list = [model, cache_salt, extra_key, text]
    if family:
        fields.append(family)
    elif chunk_context:
        digest = hashlib.blake2b(chunk_context.encode("utf-8"), digest_size=16).hexdigest()
        fields.append(["chunk_context", digest])  # a list: never equal to a family's name
    raw = json.dumps(fields, ensure_ascii=False)
    return hashlib.blake2b(raw.encode("utf-8"), digest_size=16).hexdigest()


def default_state_path(input_path: Path) -> Path:
    """``<input>.ingest-state.jsonl`` beside the input file or folder."""
    input_path = Path(input_path).resolve()
    return input_path.with_name(input_path.name + ".ingest-state.jsonl")


@dataclass(frozen=True)
class StateRecord:
    """One precomputed chunk: its key, and where it came from (for a reader of the file)."""

    key: str
    doc_id: str
    index: int
    num_tokens: int

    def __post_init__(self) -> None:
        if not isinstance(self.key, str) or not self.key:
            raise ValueError(f"a state record needs a str key, got {self.key!r}")


class IngestState:
    """The keys of the chunks done, and the file they are appended to.

    ``dropped_partial_line`` says whether opening dropped a cut-off last line.
    """

    def __init__(self, path: Path, *, fresh: bool = False) -> None:
        self.path = Path(path)
        self._keys: set[str] = set()
        self.dropped_partial_line = False
        if fresh or not self.path.exists() or self.path.stat().st_size == 0:
            self._write_header()
        else:
            self._load()
        self._file = open(self.path, "a", encoding="utf-8")

    def __contains__(self, key: str) -> bool:
        return key in self._keys

    def __len__(self) -> int:
        return len(self._keys)

    def record(self, records: Iterable[StateRecord]) -> None:
        """Append ``records`` (one finished batch) and make them durable before returning."""
        records = list(records)
        if not records:
            return
        self._file.write("".join(json.dumps(asdict(r), ensure_ascii=False) + "\n"
                                 for r in records))
        self._file.flush()
        os.fsync(self._file.fileno())
        self._keys.update(r.key for r in records)

    def close(self) -> None:
        self._file.close()

    def __enter__(self) -> IngestState:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def check_integrity(self) -> None:
        """The file holds exactly the keys in memory (``AssertionError`` otherwise)."""
        self._file.flush()
        on_disk = IngestState._read_keys(self.path)[0]
        assert on_disk == self._keys, (
            f"{self.path}: {len(on_disk)} keys on disk, {len(self._keys)} in memory")

    # ------------------------------------------------------------------------ file

    def _write_header(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "w", encoding="utf-8") as f:
            f.write(HEADER + "\n")
            f.flush()
            os.fsync(f.fileno())

    def _load(self) -> None:
        keys, good_bytes, dropped = self._read_keys(self.path)
        self._keys = keys
        if dropped:
            self.dropped_partial_line = True
            with open(self.path, "r+b") as f:
                f.truncate(good_bytes)
            if good_bytes == 0:
                self._write_header()
        elif not self.path.read_bytes().endswith(b"\n"):  # cut right before a newline
            with open(self.path, "a", encoding="utf-8") as f:
                f.write("\n")

    @staticmethod
    def _read_keys(path: Path) -> tuple[set[str], int, bool]:
        """(keys, bytes up to the last good line, whether a cut-off last line was dropped)."""
        data = path.read_bytes()
        lines = data.split(b"\n")
        if lines and lines[-1] == b"":
            lines.pop()
        keys: set[str] = set()
        offset = 0
        for number, raw in enumerate(lines, 1):
            last = number == len(lines)
            line = raw.decode("utf-8", errors="replace")
            if number == 1:
                if line != HEADER:
                    if last and HEADER.startswith(line):  # the header itself was cut off
                        return keys, 0, True
                    raise ValueError(f"{path}: not an ingest state file (its first line is not "
                                     f"{HEADER}); pass another --state")
            else:
                key = _record_key(line)
                if key is None:
                    if last:
                        return keys, offset, True
                    raise ValueError(f"{path}:{number}: damaged state record; delete the file "
                                     "or pass --fresh to precompute everything again")
                keys.add(key)
            offset += len(raw) + 1
        return keys, offset, False


def _record_key(line: str) -> str | None:
    try:
        raw = json.loads(line)
    except json.JSONDecodeError:
        return None
    if not isinstance(raw, dict) or not isinstance(raw.get("key"), str) or not raw["key"]:
        return None
    return raw["key"]
