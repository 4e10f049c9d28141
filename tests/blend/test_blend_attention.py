"""Scattered-row attention == dense causal attention with the rows gathered afterwards."""

from __future__ import annotations

import pytest
import torch
from tests.blend.blend_reference import ref_causal_attention
from hypothesis import given, settings
from hypothesis import strategies as st

from sglang_cacheblend.blend import ScatteredAttention
from sglang_cacheblend.blend.decoder import DecoderDims

TOL = {torch.float32: {"atol": 2e-5, "rtol": 1e-4}, torch.bfloat16: {"atol": 2e-2, "rtol": 2e-2}}


def _attend_once(q, k, v, pos, cu_q, cu_k, **kwargs):
    """Plan for these tensors' heads, dtype and device, and run once."""
    plan = ScatteredAttention(
        pos, cu_q, cu_k, num_q_heads=q.shape[1], num_kv_heads=k.shape[1], head_dim=q.shape[2],
        dtype=q.dtype, device=q.device, **kwargs,
    )
    return plan.run(q, k, v)


def _batch(lengths, rows_per_req, hq, hkv, dim, dtype, seed):
    """Packed q rows, packed k/v, positions, offsets and the float64 reference output."""
    gen = torch.Generator().manual_seed(seed)
    qs, ks, vs, pos, refs = [], [], [], [], []
    for length, rows in zip(lengths, rows_per_req):
        q = torch.randn(length, hq, dim, generator=gen).to(dtype)
        k = torch.randn(length, hkv, dim, generator=gen).to(dtype)
        v = torch.randn(length, hkv, dim, generator=gen).to(dtype)
        dense = ref_causal_attention(q, k, v, dim**-0.5)
        qs.append(q[rows])
        ks.append(k)
        vs.append(v)
        pos.append(rows)
        refs.append(dense[rows])
    cu_q = torch.tensor([0] + [len(r) for r in rows_per_req]).cumsum(0)
    cu_k = torch.tensor([0] + list(lengths)).cumsum(0)
    return torch.cat(qs), torch.cat(ks), torch.cat(vs), torch.cat(pos), cu_q, cu_k, torch.cat(refs)


def _random_rows(length: int, gen: torch.Generator, kind: str) -> torch.Tensor:
    if kind == "all":
        return torch.arange(length)
    if kind == "one":
        return torch.randint(0, length, (1,), generator=gen)
    if kind == "first":
        return torch.tensor([0])
    if kind == "none":
        return torch.zeros(0, dtype=torch.int64)
    share = torch.rand(length, generator=gen) < 0.2
    share[max(0, length - 5) :] = True  # a contiguous "question" at the end
    return torch.nonzero(share).flatten()


@settings(max_examples=30, deadline=None)
@given(
    seed=st.integers(0, 2**31 - 1),
    lengths=st.lists(st.integers(1, 200), min_size=1, max_size=4),
    kinds=st.lists(
        st.sampled_from(["scattered", "scattered", "all", "one", "first", "none"]),
        min_size=4,
        max_size=4,
    ),
    gqa=st.sampled_from([(4, 4), (4, 2), (9, 3), (8, 1)]),
    dim=st.sampled_from([64, 128]),
    dtype=st.sampled_from([torch.float32, torch.bfloat16]),
    block_rows=st.sampled_from([1, 7, 64]),
)
def test_matches_dense_causal(seed, lengths, kinds, gqa, dim, dtype, block_rows):
    gen = torch.Generator().manual_seed(seed)
    rows = [_random_rows(n, gen, kind) for n, kind in zip(lengths, kinds)]
    q, k, v, pos, cu_q, cu_k, ref = _batch(lengths, rows, gqa[0], gqa[1], dim, dtype, seed)
    plan = ScatteredAttention(
        pos,
        cu_q,
        cu_k,
        num_q_heads=gqa[0],
        num_kv_heads=gqa[1],
        head_dim=dim,
        dtype=dtype,
        block_rows=block_rows,
    )
    out = plan.run(q, k, v)
    assert out.shape == q.shape and out.dtype == dtype
    torch.testing.assert_close(out.double(), ref, **TOL[dtype])
    # plan once, run per layer: a second layer's tensors through the same plan
    q2, k2, v2 = q.flip(-1).contiguous(), k * 0.5, v.roll(1, dims=0)
    out2 = plan.run(q2, k2, v2)
    want2 = _attend_once(q2, k2, v2, pos, cu_q, cu_k)
    torch.testing.assert_close(out2, want2, **TOL[dtype])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_edge_cases(dtype):
    lengths = [1, 5, 300, 2]
    rows = [torch.tensor([0]), torch.tensor([0, 4]), torch.arange(200, 300), torch.tensor([1])]
    q, k, v, pos, cu_q, cu_k, ref = _batch(lengths, rows, 6, 2, 64, dtype, seed=11)
    out = _attend_once(q, k, v, pos, cu_q, cu_k)
    torch.testing.assert_close(out.double(), ref, **TOL[dtype])
    # q as a strided view of a fused projection output gives the same result
    fused = torch.cat([q, torch.randn_like(q)], dim=1)[:, : q.shape[1]]
    assert not fused.is_contiguous()
    torch.testing.assert_close(_attend_once(fused, k, v, pos, cu_q, cu_k), out)
    # a request of length 1 attends to its own single key: output == its value
    torch.testing.assert_close(out[0].double(), v[0].repeat_interleave(3, 0).double(), **TOL[dtype])


def test_exact_mask_differs_from_bottom_right():
    """A scattered row must not see later keys (the bottom-right mask lets it)."""
    length, rows = 40, torch.tensor([3, 10, 39])
    q, k, v, pos, cu_q, cu_k, ref = _batch([length], [rows], 2, 2, 64, torch.float32, seed=2)
    out = _attend_once(q, k, v, pos, cu_q, cu_k)
    torch.testing.assert_close(out.double(), ref, **TOL[torch.float32])
    bottom_right = torch.ones(3, length, dtype=torch.bool).tril(length - 3)
    wrong = torch.nn.functional.scaled_dot_product_attention(
        q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1), attn_mask=bottom_right
    ).transpose(0, 1)
    assert not torch.allclose(wrong[0].double(), ref[0], atol=1e-3)


def test_custom_scale():
    q, k, v, pos, cu_q, cu_k, _ = _batch([30], [torch.tensor([5, 29])], 2, 1, 64, torch.float32, 4)
    ref = ref_causal_attention(torch.zeros(30, 2, 64).index_copy(0, pos, q), k, v, scale=0.3)[pos]
    out = _attend_once(q, k, v, pos, cu_q, cu_k, scale=0.3)
    torch.testing.assert_close(out.double(), ref, **TOL[torch.float32])


class _OpsHeads:
    """Stands for a DecoderOps: plain attributes, not a dataclass."""

    num_q_heads, num_kv_heads, head_dim = 6, 2, 64


@pytest.mark.parametrize("dims", [DecoderDims(3, 6, 2, 64), _OpsHeads()])
def test_for_request_is_one_request_of_the_general_plan(dims):
    length, rows = 90, torch.tensor([2, 17, 40, 85, 86, 87, 88, 89])
    q, k, v, pos, cu_q, cu_k, ref = _batch([length], [rows], 6, 2, 64, torch.float32, seed=5)
    plan = ScatteredAttention.for_request(pos, length, dims, dtype=torch.float32, device="cpu")
    assert (plan.num_q_heads, plan.num_kv_heads, plan.head_dim) == (6, 2, 64)
    assert plan.q_offsets == [0, rows.numel()] and plan.k_offsets == [0, length]
    out = plan.run(q, k, v)
    assert torch.equal(out, _attend_once(q, k, v, pos, cu_q, cu_k))
    torch.testing.assert_close(out.double(), ref, **TOL[torch.float32])
    with pytest.raises(ValueError, match="strictly increasing"):
        ScatteredAttention.for_request(pos, 80, dims, dtype=torch.float32, device="cpu")


def test_validation():
    pos, cu_q, cu_k = torch.tensor([1, 3]), torch.tensor([0, 2]), torch.tensor([0, 4])
    kw = {"num_q_heads": 4, "num_kv_heads": 2, "head_dim": 8, "dtype": torch.float32}
    with pytest.raises(ValueError, match="strictly increasing"):
        ScatteredAttention(torch.tensor([3, 1]), cu_q, cu_k, **kw)
    with pytest.raises(ValueError, match="strictly increasing"):
        ScatteredAttention(torch.tensor([1, 4]), cu_q, cu_k, **kw)
    with pytest.raises(ValueError, match="cu_q"):
        ScatteredAttention(pos, torch.tensor([0, 3]), cu_k, **kw)
    with pytest.raises(ValueError, match="same length"):
        ScatteredAttention(pos, cu_q, torch.tensor([0, 2, 4]), **kw)
    with pytest.raises(ValueError, match="multiple"):
        ScatteredAttention(pos, cu_q, cu_k, **{**kw, "num_q_heads": 3})
    with pytest.raises(ValueError, match="dtype"):
        ScatteredAttention(pos, cu_q, cu_k, **{**kw, "dtype": torch.int32})
    with pytest.raises(ValueError, match="backend"):
        ScatteredAttention(pos, cu_q, cu_k, **kw, backend="flashinfer")  # CPU tensors
    plan = ScatteredAttention(pos, cu_q, cu_k, **kw)
    assert plan.backend == "torch"
    q, kv = torch.randn(2, 4, 8), torch.randn(4, 2, 8)
    with pytest.raises(ValueError, match="q must be"):
        plan.run(q.bfloat16(), kv, kv)
    with pytest.raises(ValueError, match="k must be"):
        plan.run(q, kv[:3], kv)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_flashinfer_path_matches_torch_path(dtype):
    pytest.importorskip("flashinfer")
    gen = torch.Generator().manual_seed(0)
    lengths = [700, 1, 333]
    rows = [_random_rows(n, gen, "scattered") for n in lengths]
    q, k, v, pos, cu_q, cu_k, ref = _batch(lengths, rows, 8, 2, 128, dtype, seed=9)
    kw = {"num_q_heads": 8, "num_kv_heads": 2, "head_dim": 128, "dtype": dtype}
    gpu = ScatteredAttention(pos, cu_q, cu_k, **kw, device="cuda")
    assert gpu.backend == "flashinfer"
    out = gpu.run(q.cuda(), k.cuda(), v.cuda()).cpu()
    cpu = ScatteredAttention(pos, cu_q, cu_k, **kw).run(q, k, v)
    torch.testing.assert_close(out.float(), cpu.float(), atol=2e-2, rtol=2e-2)
    torch.testing.assert_close(out.double(), ref, atol=2e-2, rtol=2e-2)
