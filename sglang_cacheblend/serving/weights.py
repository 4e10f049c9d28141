"""Which weights chunk KV was computed with: part of every chunk's namespace (issue 25 G3).

Chunk KV outlives the process that computed it (host RAM, disk, Mooncake), so its key must name
the weights, not only the model's path: the same path can hold other weights after an in-place
update, a re-pointed symlink or a new download, and SGLang can swap weights in a running server
(``/update_weights_from_disk``, ``_from_tensor``, ``_from_distributed``, ``_from_ipc``).

:func:`weights_fingerprint` identifies the files of a local model folder (``config.json``'s bytes
and each weight file's name, size and modification time: a weight file cannot change without
one of those changing, short of someone restoring its mtime by hand). A model that is not a
local folder (a hub id) is named by its path and revision only. :class:`WeightsIdentity` adds
a generation that every weight update moves on, so KV computed before an update is never looked
up after it.
"""

from __future__ import annotations

import hashlib
import json
import uuid
from pathlib import Path

__all__ = ["WeightsIdentity", "weights_fingerprint"]

_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf", ".npz")


def weights_fingerprint(model_path: str | Path) -> str:
    """A short digest of a local model folder's config and weight files; "" when
    ``model_path`` is not a local folder."""
    folder = Path(model_path)
    if not folder.is_dir():
        return ""
    digest = hashlib.blake2b(digest_size=8)
    config = folder / "config.json"
    if config.is_file():
        digest.update(config.read_bytes())
    for path in sorted(folder.rglob("*")):
        if path.is_file() and path.name.endswith(_WEIGHT_SUFFIXES):
            stat = path.stat()
            record = [str(path.relative_to(folder)), stat.st_size, stat.st_mtime_ns]
            digest.update(json.dumps(record).encode())
    return digest.hexdigest()


class WeightsIdentity:
    """The model identity in chunk namespaces: path, revision, weights fingerprint and a
    generation that :meth:`changed` moves on."""

    def __init__(self, model_path: str, revision: str | None = None) -> None:
        self._base = model_path if revision is None else f"{model_path}@{revision}"
        self._current = self._name(model_path)

    def _name(self, model_path: str | None, generation: str = "") -> str:
        fingerprint = weights_fingerprint(model_path) if model_path else ""
        parts = [self._base, *([f"w{fingerprint}"] if fingerprint else []),
                 *([generation] if generation else [])]
        return "#".join(parts)

    @property
    def current(self) -> str:
        return self._current

    def changed(self, model_path: str | None = None) -> str:
        """The weights were replaced (from ``model_path`` when they came from a folder):
        a new identity, different from every earlier one, so no KV of the old weights is
        looked up again (a random generation: two servers that update to the same weights
        do not share KV computed after an update, which is the safe side)."""
        self._current = self._name(model_path, f"g{uuid.uuid4().hex[:12]}")
        return self._current
