"""What the index keeps per chunk and per request, and checks of the chunk values it takes."""

from __future__ import annotations

from collections.abc import Hashable
from dataclasses import dataclass, field

import torch


@dataclass(eq=False)
class ChunkEntry:
    """One cached chunk; mutable, internal to the index (never handed out)."""

    entry_id: int
    namespace: Hashable
    digest: Hashable
    token_bytes: bytes
    kv_loc: torch.Tensor
    positions: torch.Tensor
    length: int
    last_access_time: float
    lock_count: int = 0


@dataclass(eq=False)
class RequestLocks:
    """The entries one request holds, and the spans already counted in its stats."""

    entry_ids: dict[int, None] = field(default_factory=dict)  # in lock order
    counted_spans: set[tuple[int, int]] = field(default_factory=set)


def check_kv_loc(kv_loc: torch.Tensor, chunk_len: int) -> None:
    if not isinstance(kv_loc, torch.Tensor) or kv_loc.dtype != torch.int64:
        raise ValueError(f"kv_loc must be an int64 tensor, got {getattr(kv_loc, 'dtype', kv_loc)}")
    if kv_loc.shape != (chunk_len,):
        raise ValueError(
            f"kv_loc must have shape ({chunk_len},) like the chunk, got {tuple(kv_loc.shape)}"
        )


def as_positions(positions: int | torch.Tensor, chunk_len: int) -> torch.Tensor:
    if isinstance(positions, torch.Tensor):
        if positions.dtype != torch.int64 or positions.shape != (chunk_len,):
            raise ValueError(
                f"positions must be an int64 tensor of shape ({chunk_len},), got "
                f"{positions.dtype} of shape {tuple(positions.shape)}"
            )
        return positions.to("cpu")
    start = int(positions)
    if start < 0:
        raise ValueError(f"start position must be >= 0, got {start}")
    return torch.arange(start, start + chunk_len, dtype=torch.int64)


def redundant_slots(entry: ChunkEntry, kv_loc: torch.Tensor) -> torch.Tensor | None:
    """The caller's slots that a duplicate insert of ``entry`` leaves for the caller to free.

    ``None`` when ``kv_loc`` are exactly the entry's own slots (nothing to free). Slots that
    overlap the entry's without being equal to them would be freed twice later, so they raise
    ``ValueError``.
    """
    if _same_slots(entry, kv_loc):
        return None
    if torch.isin(kv_loc, entry.kv_loc.to(kv_loc.device)).any():
        raise ValueError(
            f"kv_loc of a duplicate insert overlaps the slots of entry {entry.entry_id} "
            "without being equal to them"
        )
    return kv_loc


def _same_slots(entry: ChunkEntry, kv_loc: torch.Tensor) -> bool:
    return entry.kv_loc.device == kv_loc.device and torch.equal(entry.kv_loc, kv_loc)
