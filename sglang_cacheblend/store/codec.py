"""One chunk's KV as bytes: what the disk tier writes to a file and the Mooncake tier stores.

The bytes are a safetensors blob (tensors ``k``, ``v``, ``positions``, ``token_ids``) whose
metadata carries the format name, its version, the key it was stored under and a BLAKE2b
checksum of every tensor, so :func:`decode` tells a truncated, corrupted, foreign-version or
misfiled entry from a good one and never returns a damaged chunk.
"""

from __future__ import annotations

import hashlib
import json
import struct

import torch
from safetensors.torch import load, save

from sglang_cacheblend.store.entry import ChunkKV

__all__ = ["FORMAT", "VERSION", "decode", "encode"]

FORMAT = "sglang-cacheblend-chunk"
VERSION = "1"
_FIELDS = ("k", "v", "positions", "token_ids")


def _checksum(tensors: dict[str, torch.Tensor]) -> str:
    """BLAKE2b-256 over every tensor's dtype, shape and bytes, in field order."""
    digest = hashlib.blake2b(digest_size=32)
    for name in _FIELDS:
        t = tensors[name].contiguous()
        digest.update(f"{name}:{t.dtype}:{tuple(t.shape)};".encode())
        digest.update(t.view(torch.uint8).numpy().data if t.numel() else b"")
    return digest.hexdigest()


def encode(key: str, kv: ChunkKV, *, version: str = VERSION) -> bytes:
    """``kv`` as safetensors bytes, tagged with ``key`` and a checksum.

    ``version`` is the format version written; only tests write another one (to check that
    a reader refuses it). Tensors are copied to contiguous memory if they are not.
    """
    tensors = {name: getattr(kv, name).contiguous() for name in _FIELDS}
    meta = {"format": FORMAT, "version": version, "key": key, "checksum": _checksum(tensors)}
    return save(tensors, metadata=meta)


def _metadata(data: bytes) -> dict[str, str]:
    """The ``__metadata__`` of a safetensors blob, read from its header alone."""
    if len(data) < 8:
        raise ValueError(f"truncated: {len(data)} bytes, no safetensors header")
    (header_len,) = struct.unpack("<Q", data[:8])
    if header_len > len(data) - 8:
        raise ValueError(f"truncated: header of {header_len} bytes, {len(data) - 8} present")
    try:
        header = json.loads(data[8:8 + header_len])
    except ValueError as exc:
        raise ValueError(f"unreadable safetensors header ({exc})") from None
    meta = header.get("__metadata__") if isinstance(header, dict) else None
    return meta if isinstance(meta, dict) else {}


def decode(key: str, data: bytes) -> ChunkKV:
    """The :class:`ChunkKV` in ``data``, checked to be whole and stored under ``key``.

    Raises ``ValueError`` naming the problem: truncated or unreadable bytes, another format
    or version, another key, missing tensors, a checksum mismatch or inconsistent shapes.
    The tensors returned are CPU copies, independent of ``data``.
    """
    meta = _metadata(data)
    if meta.get("format") != FORMAT or meta.get("version") != VERSION:
        raise ValueError(f"format {meta.get('format')!r} version {meta.get('version')!r}, "
                         f"expected {FORMAT!r} {VERSION!r}")
    if meta.get("key") != key:
        raise ValueError(f"stored under key {meta.get('key')!r}, expected {key!r}")
    try:
        tensors = load(data)
    except Exception as exc:  # noqa: BLE001 - safetensors raises its own error types
        raise ValueError(f"truncated or unreadable tensors ({exc})") from None
    if sorted(tensors) != sorted(_FIELDS):
        raise ValueError(f"tensors {sorted(tensors)}, expected {sorted(_FIELDS)}")
    if _checksum(tensors) != meta.get("checksum"):
        raise ValueError("checksum mismatch")
    return ChunkKV(**{name: tensors[name] for name in _FIELDS})
