"""The Loading Controller's layer pipeline: chunk KV brought in layer by layer, behind compute.

A blended request needs, at every layer, the KV of each of its chunks in its own slots, keys
realigned to the chunk's place in this prompt. Its chunks come from pool slots (a pool hit, or a
miss just computed standalone) or from a tier below the pool (a :class:`ChunkLoad`: CPU tensors
fetched at admission, to be written into pool slots the cache allocated). :class:`ChunkSeeder`
does one layer of that for all chunks at once: loads written into their slots, then one gather,
rotation and scatter into the request's slots.

:class:`LayerPipeline` runs the seeder for layer ``i + 1`` on a loader thread while the model
computes layer ``i``, so the first layer starts once *its* KV is in, not all of it; the forward
waits only where a layer's KV is not there yet. Without pipelining every layer is seeded before
the first one runs. The two threads touch different per-layer buffers at any time (the loader
only layers the model has not reached), and chunk slots are only read. A loader error is raised
in the forward at its next wait, which turns the request into a full prefill.

On CUDA the loader would issue its copies on a side stream with an event per layer; that path is
not written yet, so on CUDA the seeding runs synchronously (``pipelined`` is forced off).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from sglang_cacheblend.blend.realign import realign_keys_inplace
from sglang_cacheblend.blend.rotary_config import RotaryConfig
from sglang_cacheblend.serving.blend_request import ChunkHit, ChunkLoad
from sglang_cacheblend.serving.pool_io import write_chunk_layer

__all__ = ["ChunkSeeder", "LayerPipeline", "LoadTimes"]

_WAIT_TIMEOUT_S = 300.0


@dataclass
class LoadTimes:
    """Where a request's chunk KV loading spent its time (seconds)."""

    load_s: float = 0.0  # seeding work, on whichever thread did it
    wait_s: float = 0.0  # time the forward waited for a layer's KV
    layers: int = 0
    per_layer_s: list[float] = field(default_factory=list)


class ChunkSeeder:
    """One layer of every chunk's KV into the request's slots.

    ``hits``: chunk KV already in pool slots; ``loads``: chunk KV from a lower tier, written
    into their slots first (the index takes those slots after the forward). ``slots`` are the
    request's slots by position; spans inside the radix prefix (``< prefix_len``) are skipped:
    exact KV beats reused KV.
    """

    def __init__(self, pool: Any, slots: torch.Tensor, prefix_len: int,
                 hits: Sequence[ChunkHit], loads: Sequence[ChunkLoad],
                 rotary: RotaryConfig) -> None:
        self._pool, self._rotary = pool, rotary
        self._loads = list(loads)
        self.reuse_mask = torch.zeros(slots.numel() - prefix_len, dtype=torch.bool)
        src, dst, old, new = [], [], [], []
        chunks = [*hits, *(load.as_hit() for load in self._loads)]
        for hit in chunks:
            start = max(hit.start, prefix_len)
            if start >= hit.end:
                continue
            skip = start - hit.start
            src.append(hit.kv_loc[skip:].to(slots.device))
            dst.append(slots[start:hit.end])
            old.append(hit.positions[skip:].to(torch.int64))
            new.append(torch.arange(start, hit.end))
            self.reuse_mask[start - prefix_len: hit.end - prefix_len] = True
        self._empty = not src
        if not self._empty:
            device = pool.get_key_buffer(0).device
            self._src, self._dst = torch.cat(src), torch.cat(dst)
            self._old, self._new = torch.cat(old).to(device), torch.cat(new).to(device)

    def seed(self, layer: int) -> None:
        for load in self._loads:
            write_chunk_layer(self._pool, layer, load.kv_loc, load.kv)
        if self._empty:
            return
        k_buf = self._pool.get_key_buffer(layer)
        v_buf = self._pool.get_value_buffer(layer)
        keys = k_buf[self._src]  # a gathered copy: rotate it in place
        realign_keys_inplace(keys, self._old, self._new, self._rotary)
        k_buf[self._dst] = keys
        v_buf[self._dst] = v_buf[self._src]


class LayerPipeline:
    """Seeds layers ``0..num_layers-1`` in order, on a loader thread when ``pipelined``.

    ``wait(layer)`` returns once that layer's chunk KV is in the request's slots (raising the
    loader's error, if it failed); call :meth:`close` when the forward ends, however it ends.
    """

    def __init__(self, seeder: ChunkSeeder, num_layers: int, *, pipelined: bool) -> None:
        self._seeder, self._num_layers = seeder, num_layers
        self.times = LoadTimes(layers=num_layers)
        self._ready = [threading.Event() for _ in range(num_layers)]
        self._error: BaseException | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        if pipelined:
            self._thread = threading.Thread(target=self._run, name="cacheblend-loader",
                                            daemon=True)
            self._thread.start()
        else:
            self._run()
            self._raise_if_failed()

    def _run(self) -> None:
        try:
            for layer in range(self._num_layers):
                if self._stop.is_set():
                    return
                started = time.perf_counter()
                self._seeder.seed(layer)
                spent = time.perf_counter() - started
                self.times.per_layer_s.append(spent)
                self.times.load_s += spent
                self._ready[layer].set()
        except BaseException as exc:  # noqa: BLE001 - handed to the forward at its next wait
            self._error = exc
            for event in self._ready:
                event.set()

    def wait(self, layer: int) -> None:
        event = self._ready[layer]
        if not event.is_set():
            started = time.perf_counter()
            if not event.wait(_WAIT_TIMEOUT_S):
                raise TimeoutError(f"chunk KV of layer {layer} not loaded in {_WAIT_TIMEOUT_S} s")
            self.times.wait_s += time.perf_counter() - started
        self._raise_if_failed()

    def _raise_if_failed(self) -> None:
        if self._error is not None:
            raise RuntimeError(f"loading chunk KV failed: {self._error!r}") from self._error

    def close(self) -> None:
        """Stop the loader (after the layer it is on) and wait for it: no write after this."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
