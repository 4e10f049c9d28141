"""Attention for scattered query rows with an exact causal mask by position.

Each request ``b`` has keys/values for its positions ``0 .. kv_len_b - 1`` (cached prefix,
reused chunks and recomputed rows alike, in position order) and a sorted subset of query rows
carrying their absolute positions. A query at position ``p`` attends to keys ``0 .. p`` only,
not the bottom-right-aligned mask of the original CacheBlend and LMCache.

Packed (varlen) layout, like FlashInfer's ragged prefill::

    q  rows  [cu_q[b] : cu_q[b+1])   request b's query rows, positions strictly increasing
    kv rows  [cu_k[b] : cu_k[b+1])   request b's keys at positions 0 .. kv_len_b - 1

CPU/torch path (also used on CUDA without FlashInfer): a request's sorted rows are cut into
blocks of about ``block_rows`` (sizes evened out); a block whose last position is ``e`` attends
to ``keys[: e + 1]`` with one 4-D ``scaled_dot_product_attention`` call (3-D inputs hit the slow
math kernel). GQA is folded into rows: the query heads sharing a KV head become extra rows of
that head, so K/V are never expanded and the kernel gets taller query tiles. The exact mask is
additive, in the run dtype (the CPU flash kernel wants a float mask of the query dtype; a bool
mask would be converted on every call), built once per request by the plan and copied per
block. Work per block is ``rows x (e + 1)``, close to the ideal ``sum(p + 1)`` when a block's
rows are close in position (a contiguous run such as the question wastes only a triangle). A
one-row block needs no mask. Each torch op on a CPU is a thread-pool round trip, which costs a
scheduler tick when the cores are busy, so ``run`` issues one SDPA call per block, one copy to
fold the queries and one ``cat``.

``DEFAULT_BLOCK_ROWS`` is the fastest block size that ``benchmarks/bench_scattered_attention.py``
tried; its figures (block sizes, and the speed-up over dense causal SDPA and over stock SDPA with
one dense boolean ``(rows, kv_len)`` mask per request) are in ``docs/results/attention_bench.md``.

CUDA path: :mod:`.attention_flashinfer` (ragged prefill with a custom mask).
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Protocol

import torch
import torch.nn.functional as F

__all__ = ["AttentionHeads", "ScatteredAttention"]

_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
DEFAULT_BLOCK_ROWS = 80


@dataclass(frozen=True, eq=False)
class _Block:
    """One SDPA call: query rows ``[q_start, q_end)`` against keys ``[k_start, k_start+kv_len)``."""

    q_start: int
    q_end: int
    k_start: int
    kv_len: int
    mask: torch.Tensor | None  # (q_end - q_start, kv_len) additive, run dtype; None = all visible


class AttentionHeads(Protocol):
    """The head layout a plan needs: a :class:`~.decoder.DecoderOps` or
    :class:`~.decoder.DecoderDims` has it."""

    @property
    def num_q_heads(self) -> int: ...

    @property
    def num_kv_heads(self) -> int: ...

    @property
    def head_dim(self) -> int: ...


def _check_offsets(name: str, cu: torch.Tensor, total: int) -> list[int]:
    if cu.dim() != 1 or cu.numel() < 2 or cu.dtype not in (torch.int32, torch.int64):
        raise ValueError(
            f"{name} must be int32/int64 of shape (batch_size + 1,), got {tuple(cu.shape)}"
        )
    offs = cu.tolist()
    if offs[0] != 0 or offs[-1] != total or any(b < a for a, b in itertools.pairwise(offs)):
        raise ValueError(f"{name} must start at 0, not decrease, and end at {total}, got {offs}")
    return offs


class ScatteredAttention:
    """Exact causal attention for scattered query rows: plan once per batch, run per layer.

    Parameters
    ----------
    q_positions : torch.Tensor
        Shape ``(total_q,)``, int32/int64: absolute position of each packed query row within its
        request; strictly increasing inside a request and ``< kv_len`` of that request.
    cu_q : torch.Tensor
        Shape ``(batch_size + 1,)``, int32/int64: query row offsets per request.
    cu_k : torch.Tensor
        Shape ``(batch_size + 1,)``, int32/int64: key row offsets per request
        (``kv_len_b = cu_k[b+1] - cu_k[b]``).
    num_q_heads, num_kv_heads, head_dim : int
        ``num_q_heads`` must be a multiple of ``num_kv_heads`` (GQA).
    dtype : torch.dtype
        float32, float16 or bfloat16: dtype of q, k, v in :meth:`run`.
    device : torch.device or str
        Where the masks live (that of q, k, v).
    scale : float, optional
        Softmax scale; default ``head_dim ** -0.5``.
    block_rows : int
        Target query rows per SDPA call on the torch path (blocks are evened out, e.g. 540 rows
        -> 7 blocks of 77). The mask memory is about ``rows * group * kv_len / 2`` elements of
        ``dtype`` per request.
    backend : str
        ``"auto"`` (FlashInfer for float16/bfloat16 CUDA tensors when it imports, else torch),
        ``"torch"`` or ``"flashinfer"``.
    workspace : torch.Tensor, optional
        FlashInfer workspace (uint8, 128 MiB recommended, on ``device``); allocated if omitted.
    """

    def __init__(
        self,
        q_positions: torch.Tensor,
        cu_q: torch.Tensor,
        cu_k: torch.Tensor,
        *,
        num_q_heads: int,
        num_kv_heads: int,
        head_dim: int,
        dtype: torch.dtype,
        device: torch.device | str = "cpu",
        scale: float | None = None,
        block_rows: int = DEFAULT_BLOCK_ROWS,
        backend: str = "auto",
        workspace: torch.Tensor | None = None,
    ) -> None:
        if dtype not in _FLOAT_DTYPES:
            raise ValueError(f"dtype must be float32/float16/bfloat16, got {dtype}")
        if num_kv_heads <= 0 or num_q_heads % num_kv_heads:
            raise ValueError(
                f"num_q_heads {num_q_heads} must be a multiple of num_kv_heads {num_kv_heads}"
            )
        if block_rows <= 0:
            raise ValueError(f"block_rows must be > 0, got {block_rows}")
        if q_positions.dim() != 1 or q_positions.dtype not in (torch.int32, torch.int64):
            raise ValueError(
                "q_positions must be int32/int64 of shape (total_q,), "
                f"got {tuple(q_positions.shape)} {q_positions.dtype}"
            )
        self.num_q_heads, self.num_kv_heads, self.head_dim = num_q_heads, num_kv_heads, head_dim
        self._group = num_q_heads // num_kv_heads
        self.dtype, self.device = dtype, torch.device(device)
        self.scale = head_dim**-0.5 if scale is None else float(scale)
        self.total_q = q_positions.numel()
        self.q_offsets = _check_offsets("cu_q", cu_q, self.total_q)
        self.k_offsets = _check_offsets("cu_k", cu_k, _last(cu_k))
        if len(self.q_offsets) != len(self.k_offsets):
            raise ValueError("cu_q and cu_k must have the same length")
        self.total_k = self.k_offsets[-1]
        positions = q_positions.cpu().to(torch.int64)
        self._check_positions(positions)
        self.backend = _pick_backend(backend, self.device, dtype)
        self._blocks: list[_Block] = []
        self._flashinfer = None
        if self.backend == "flashinfer":
            from sglang_cacheblend.blend.attention_flashinfer import FlashInferScatteredPlan

            self._flashinfer = FlashInferScatteredPlan(
                positions,
                self.q_offsets,
                self.k_offsets,
                num_q_heads=num_q_heads,
                num_kv_heads=num_kv_heads,
                head_dim=head_dim,
                dtype=dtype,
                device=self.device,
                scale=self.scale,
                workspace=workspace,
            )
        else:
            self._blocks = self._plan_blocks(positions, block_rows)

    @classmethod
    def for_request(
        cls,
        q_positions: torch.Tensor,
        kv_len: int,
        dims: AttentionHeads,
        *,
        dtype: torch.dtype,
        device: torch.device | str,
    ) -> ScatteredAttention:
        """The plan of a batch of one request, the case of every caller in the blended forward.

        Parameters
        ----------
        q_positions : torch.Tensor
            Shape ``(num_q,)``, int32/int64: absolute positions of the request's query rows,
            strictly increasing and ``< kv_len``.
        kv_len : int
            The request's keys are its positions ``0..kv_len-1``.
        dims : AttentionHeads
            Head counts and head dim (a ``DecoderOps`` or ``DecoderDims``).
        dtype, device
            As in the constructor; the other parameters take their defaults.
        """
        return cls(
            q_positions,
            torch.tensor([0, q_positions.numel()], dtype=torch.int64),
            torch.tensor([0, kv_len], dtype=torch.int64),
            num_q_heads=dims.num_q_heads,
            num_kv_heads=dims.num_kv_heads,
            head_dim=dims.head_dim,
            dtype=dtype,
            device=device,
        )

    def _check_positions(self, positions: torch.Tensor) -> None:
        for b in range(len(self.q_offsets) - 1):
            pos = positions[self.q_offsets[b] : self.q_offsets[b + 1]]
            kv_len = self.k_offsets[b + 1] - self.k_offsets[b]
            if pos.numel() and (pos[0] < 0 or pos[-1] >= kv_len or (pos.diff() <= 0).any()):
                raise ValueError(
                    f"request {b}: q_positions must be strictly increasing in [0, {kv_len})"
                )

    def _plan_blocks(self, positions: torch.Tensor, block_rows: int) -> list[_Block]:
        blocks = []
        for b in range(len(self.q_offsets) - 1):
            q0, q1 = self.q_offsets[b], self.q_offsets[b + 1]
            if q1 == q0:
                continue
            k0, rows = self.k_offsets[b], positions[q0:q1]
            # One additive mask per request, then a contiguous copy per block (SDPA reads a
            # strided mask view more slowly), over the keys up to the block's last position.
            span = int(rows[-1]) + 1
            hidden = torch.arange(span)[None, :] > rows[:, None]
            mask = torch.zeros(hidden.shape, dtype=self.dtype).masked_fill_(hidden, float("-inf"))
            mask = mask.to(self.device)
            # Even block sizes (540 rows, 80 per block -> 7 x 77, not 6 x 80 + 60): a short last
            # block would leave one of two threads idle in SDPA's (head, query tile) split.
            num_blocks = -(-(q1 - q0) // block_rows)
            bounds = [round(i * (q1 - q0) / num_blocks) for i in range(num_blocks + 1)]
            for s, e in itertools.pairwise(bounds):
                end = int(rows[e - 1]) + 1
                blk_mask = None
                if e - s > 1:  # folded row r * group + g has row r's mask (see run)
                    blk_mask = mask[s:e, :end].repeat_interleave(self._group, dim=0)
                blocks.append(_Block(q0 + s, q0 + e, k0, end, blk_mask))
        return blocks

    def run(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """Attention output of the planned query rows.

        Parameters
        ----------
        q : torch.Tensor
            Shape ``(total_q, num_q_heads, head_dim)``, the planned dtype and device.
        k, v : torch.Tensor
            Shape ``(total_k, num_kv_heads, head_dim)``, same dtype and device.

        Returns
        -------
        torch.Tensor
            Shape ``(total_q, num_q_heads, head_dim)``, dtype of ``q``; a new tensor.
        """
        self._check_qkv(q, k, v)
        if self._flashinfer is not None:
            return self._flashinfer.run(q, k, v)
        if not self._blocks:
            return torch.empty_like(q)
        # GQA folded into rows: the `group` query heads of a KV head become `group` rows per
        # query row, (1, kv_heads, rows * group, dim), so K/V are neither expanded nor reloaded
        # per query head and each SDPA call gets taller query tiles. 4-D inputs: on CPU, 3-D
        # ones fall back to the slow math kernel.
        group, kv_heads, dim = self._group, self.num_kv_heads, self.head_dim
        q_fold = q.reshape(self.total_q, kv_heads, group, dim).transpose(0, 1).contiguous()
        k4 = k.transpose(0, 1).unsqueeze(0)
        v4 = v.transpose(0, 1).unsqueeze(0)
        outs = []
        for blk in self._blocks:
            num = blk.q_end - blk.q_start
            keys = slice(blk.k_start, blk.k_start + blk.kv_len)
            o = F.scaled_dot_product_attention(
                q_fold[:, blk.q_start : blk.q_end].view(1, kv_heads, num * group, dim),
                k4[:, :, keys],
                v4[:, :, keys],
                attn_mask=blk.mask,
                scale=self.scale,
            )
            outs.append(o[0].view(kv_heads, num, group, dim).transpose(0, 1))
        # One copy at the end: each extra op is a thread-pool round trip on a busy CPU.
        return torch.cat(outs, dim=0).view(self.total_q, self.num_q_heads, dim)

    def _check_qkv(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        want_q = (self.total_q, self.num_q_heads, self.head_dim)
        want_k = (self.total_k, self.num_kv_heads, self.head_dim)
        for name, t, want in (("q", q, want_q), ("k", k, want_k), ("v", v, want_k)):
            if tuple(t.shape) != want or t.dtype != self.dtype:
                raise ValueError(
                    f"{name} must be {self.dtype} of shape {want}, got {t.dtype} {tuple(t.shape)}"
                )
            if t.device != self.device:
                raise ValueError(f"{name} is on {t.device}, planned for {self.device}")


def _pick_backend(backend: str, device: torch.device, dtype: torch.dtype) -> str:
    if backend not in ("auto", "torch", "flashinfer"):
        raise ValueError(f"backend must be 'auto', 'torch' or 'flashinfer', got {backend!r}")
    usable = device.type == "cuda" and dtype in (torch.float16, torch.bfloat16)
    if usable and backend != "torch":
        try:
            import flashinfer.prefill  # noqa: F401
        except ImportError:
            usable = False
    if backend == "flashinfer" and not usable:
        raise ValueError("backend 'flashinfer' needs CUDA, float16/bfloat16 and flashinfer")
    return "flashinfer" if usable and backend != "torch" else "torch"


def _last(cu: torch.Tensor) -> int:
    return int(cu[-1]) if cu.numel() else 0
