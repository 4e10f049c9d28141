"""Chunk KV between SGLang's token pool and the store's :class:`~sglang_cacheblend.store.ChunkKV`.

The pool holds post-RoPE keys per layer in ``get_key_buffer(layer)[slot]`` (``(Hkv, D)`` rows);
a stored chunk is the same rows for every layer, on CPU, with the positions they were rotated
at, so a reader realigns them exactly as it realigns a pool hit.
"""

from __future__ import annotations

from typing import Any

import torch

from sglang_cacheblend.store.entry import ChunkKV

__all__ = ["layer_ids", "read_chunk_kv", "check_fits_pool", "write_chunk_layer"]


def layer_ids(pool: Any) -> range:
    """The layer ids the pool's buffers are addressed by."""
    start = int(getattr(pool, "start_layer", 0) or 0)
    return range(start, start + int(pool.layer_num))


def read_chunk_kv(pool: Any, kv_loc: torch.Tensor, positions: torch.Tensor,
                  token_ids: list[int] | torch.Tensor) -> ChunkKV:
    """Copy a chunk's KV out of pool slots ``kv_loc`` to CPU (before the slots are freed).

    On CPU each layer is gathered straight into its place in the result (one copy): a spill runs
    inside admission, on the request's time to first token.
    """
    layers = layer_ids(pool)
    first = pool.get_key_buffer(layers[0])
    loc = kv_loc.to(first.device)
    if first.device.type == "cpu":
        shape = (len(layers), loc.numel(), *first.shape[1:])
        k = torch.empty(shape, dtype=first.dtype)
        v = torch.empty(shape, dtype=first.dtype)
        for i, layer in enumerate(layers):
            torch.index_select(pool.get_key_buffer(layer), 0, loc, out=k[i])
            torch.index_select(pool.get_value_buffer(layer), 0, loc, out=v[i])
    else:
        k = torch.stack([pool.get_key_buffer(layer)[loc] for layer in layers]).cpu()
        v = torch.stack([pool.get_value_buffer(layer)[loc] for layer in layers]).cpu()
    ids = token_ids if isinstance(token_ids, torch.Tensor) else torch.tensor(token_ids)
    return ChunkKV(k=k, v=v, positions=positions.to("cpu", torch.int64).clone(),
                   token_ids=ids.to("cpu", torch.int64))


def check_fits_pool(kv: ChunkKV, pool: Any, token_ids: list[int] | torch.Tensor) -> str:
    """Why ``kv`` cannot go into this pool for these tokens ("" when it can).

    A stored entry is keyed by model and namespace, so a mismatch means a foreign or damaged
    entry; it is then recomputed, never served.
    """
    buffer = pool.get_key_buffer(layer_ids(pool)[0])
    want = (len(layer_ids(pool)), len(token_ids), *buffer.shape[1:])
    if tuple(kv.k.shape) != want:
        return f"shape {tuple(kv.k.shape)} does not match the pool's {want}"
    if kv.k.dtype != buffer.dtype:
        return f"dtype {kv.k.dtype} does not match the pool's {buffer.dtype}"
    ids = token_ids.tolist() if isinstance(token_ids, torch.Tensor) else list(token_ids)
    if kv.token_ids.tolist() != ids:
        return "its token ids are not the chunk's"
    return ""


def write_chunk_layer(pool: Any, layer_index: int, kv_loc: torch.Tensor, kv: ChunkKV) -> None:
    """Write layer ``layer_index`` (0-based within the pool) of ``kv`` into slots ``kv_loc``."""
    layer = layer_ids(pool)[layer_index]
    k_buf, v_buf = pool.get_key_buffer(layer), pool.get_value_buffer(layer)
    loc = kv_loc.to(k_buf.device)
    k_buf[loc] = kv.k[layer_index].to(k_buf.device, non_blocking=True)
    v_buf[loc] = kv.v[layer_index].to(v_buf.device, non_blocking=True)
