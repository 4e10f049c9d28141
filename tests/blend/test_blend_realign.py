"""RoPE realignment: realign(rope(k, old), old, new) == rope(k, new) for every supported style."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from tests.blend.blend_reference import ref_inv_freq, ref_rope
from hypothesis import given, settings
from hypothesis import strategies as st

from sglang_cacheblend.blend import RotaryConfig, realign_keys, realign_keys_inplace
from sglang_cacheblend.blend.realign import _use_flashinfer

LLAMA3 = {
    "rope_type": "llama3",
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 8192,
}
LINEAR = {"type": "linear", "factor": 2.5}
SCALINGS = {"plain": None, "linear": LINEAR, "llama3": LLAMA3}
TOL = {
    torch.float32: {"atol": 2e-5, "rtol": 2e-5},
    torch.float16: {"atol": 8e-3, "rtol": 4e-3},
    torch.bfloat16: {"atol": 6e-2, "rtol": 2e-2},
}


def _case(rotary: RotaryConfig, tokens: int, heads: int, dtype, seed: int, max_pos: int = 32768):
    gen = torch.Generator().manual_seed(seed)
    raw = torch.randn(tokens, heads, rotary.head_dim, generator=gen, dtype=torch.float64)
    old = torch.randint(0, max_pos, (tokens,), generator=gen)
    new = torch.randint(0, max_pos, (tokens,), generator=gen)
    freqs = rotary.inv_freq()
    cached = ref_rope(raw, old, freqs, rotary.rotary_dim, rotary.is_neox_style).to(dtype)
    want = ref_rope(raw, new, freqs, rotary.rotary_dim, rotary.is_neox_style).to(dtype)
    return cached, old, new, want


@pytest.mark.parametrize("scaling", list(SCALINGS), ids=list(SCALINGS))
@pytest.mark.parametrize("neox", [True, False], ids=["neox", "gptj"])
@pytest.mark.parametrize("rot_frac", [1.0, 0.5, 0.25])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_realign_matches_rope_at_new_positions(scaling, neox, rot_frac, dtype):
    head_dim = 64
    rotary = RotaryConfig(
        head_dim=head_dim,
        rotary_dim=int(head_dim * rot_frac),
        base=100000.0,
        is_neox_style=neox,
        scaling=SCALINGS[scaling],
    )
    cached, old, new, want = _case(rotary, tokens=97, heads=3, dtype=dtype, seed=7)
    got = realign_keys(cached, old, new, rotary)
    assert got.dtype == dtype and got.shape == cached.shape
    torch.testing.assert_close(got.float(), want.float(), **TOL[dtype])
    # the part beyond rotary_dim is untouched, bit for bit
    assert torch.equal(got[..., rotary.rotary_dim :], cached[..., rotary.rotary_dim :])


@settings(max_examples=25, deadline=None)
@given(
    seed=st.integers(0, 2**31 - 1),
    tokens=st.integers(1, 40),
    heads=st.integers(1, 4),
    head_dim=st.sampled_from([16, 64, 128]),
    rot_frac=st.sampled_from([1.0, 0.5]),
    neox=st.booleans(),
    scaling=st.sampled_from(list(SCALINGS)),
    base=st.sampled_from([10000.0, 500000.0]),
)
def test_realign_random_shapes(seed, tokens, heads, head_dim, rot_frac, neox, scaling, base):
    rotary = RotaryConfig(head_dim, int(head_dim * rot_frac), base, neox, SCALINGS[scaling])
    cached, old, new, want = _case(rotary, tokens, heads, torch.float32, seed)
    got = cached.clone()
    assert realign_keys_inplace(got, old.to(torch.int32), new, rotary) is None
    torch.testing.assert_close(got, want, **TOL[torch.float32])


def test_large_positions_and_negative_deltas():
    rotary = RotaryConfig(head_dim=64, rotary_dim=64, base=10000.0)
    raw = torch.randn(4, 2, 64, dtype=torch.float64)
    old = torch.tensor([30000, 0, 29999, 12345])
    new = torch.tensor([0, 30000, 30000, 12345])  # -30000, +30000, +1, 0
    freqs = rotary.inv_freq()
    cached = ref_rope(raw, old, freqs, 64, True).float()
    got = realign_keys(cached, old, new, rotary)
    torch.testing.assert_close(
        got, ref_rope(raw, new, freqs, 64, True).float(), **TOL[torch.float32]
    )
    assert torch.equal(got[3], cached[3])  # delta 0 is the identity


def test_round_trip_and_one_token():
    rotary = RotaryConfig(head_dim=32, rotary_dim=32, is_neox_style=False)
    keys = torch.randn(1, 1, 32)
    old, new = torch.tensor([5]), torch.tensor([20000])
    there = realign_keys(keys, old, new, rotary)
    assert not torch.allclose(there, keys)
    torch.testing.assert_close(realign_keys(there, new, old, rotary), keys, atol=1e-5, rtol=1e-5)
    empty = torch.empty(0, 1, 32)
    assert realign_keys(empty, old[:0], new[:0], rotary).shape == (0, 1, 32)


def test_out_of_place_keeps_input_and_handles_strided_views():
    rotary = RotaryConfig(head_dim=16, rotary_dim=16)
    storage = torch.randn(3, 10, 16).transpose(0, 1)  # (10, 3, 16), not contiguous
    before = storage.clone()
    old, new = torch.arange(10), torch.arange(10) + 100
    out = realign_keys(storage, old, new, rotary)
    assert torch.equal(storage, before)
    realign_keys_inplace(storage, old, new, rotary)
    torch.testing.assert_close(storage, out)


@pytest.mark.parametrize(
    "scaling",
    [
        {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 4096},
        {"type": "dynamic", "factor": 2.0},
        {"rope_type": "longrope", "short_factor": [1.0], "long_factor": [2.0]},
        {"rope_type": "su", "short_factor": [1.0], "long_factor": [2.0]},
        {"rope_type": "deepseek_yarn", "factor": 40.0},
        {"rope_type": "mrope", "mrope_section": [16, 24, 24]},
    ],
)
def test_refuses_inexact_scalings(scaling):
    kind = scaling.get("rope_type", scaling.get("type"))
    with pytest.raises(ValueError, match=kind):
        RotaryConfig(head_dim=64, rotary_dim=64, scaling=scaling)
    with pytest.raises(ValueError, match="cannot be realigned"):
        RotaryConfig.from_hf_config({"head_dim": 64, "rope_scaling": scaling})


@pytest.mark.parametrize(
    "kwargs",
    [
        {"head_dim": 64, "rotary_dim": 63},
        {"head_dim": 64, "rotary_dim": 128},
        {"head_dim": 0, "rotary_dim": 0},
        {"head_dim": 64, "rotary_dim": 64, "base": 0.5},
        {"head_dim": 64, "rotary_dim": 64, "scaling": {"type": "linear", "factor": 0}},
        {"head_dim": 64, "rotary_dim": 64, "scaling": {"rope_type": "llama3", "factor": 8.0}},
    ],
)
def test_rotary_config_validation(kwargs):
    with pytest.raises(ValueError):
        RotaryConfig(**kwargs)


def test_inv_freq_matches_reference():
    for name, scaling in SCALINGS.items():
        rotary = RotaryConfig(head_dim=128, rotary_dim=128, base=500000.0, scaling=scaling)
        want = torch.tensor(ref_inv_freq(128, 500000.0, scaling), dtype=torch.float64)
        got = rotary.inv_freq().double()
        torch.testing.assert_close(got, want, rtol=1e-6, atol=0, msg=name)
    # llama3 really changes the low frequencies and keeps the high ones
    plain = RotaryConfig(128, 128, 500000.0).inv_freq()
    scaled = RotaryConfig(128, 128, 500000.0, scaling=LLAMA3).inv_freq()
    assert scaled[0] == plain[0] and torch.isclose(scaled[-1], plain[-1] / 8)


def test_from_hf_config():
    smol = {"hidden_size": 576, "num_attention_heads": 9, "rope_theta": 100000.0}
    assert RotaryConfig.from_hf_config(smol) == RotaryConfig(64, 64, 100000.0, True, None)
    obj = SimpleNamespace(
        hidden_size=4096,
        num_attention_heads=32,
        head_dim=None,
        rope_theta=500000.0,
        rope_scaling=dict(LLAMA3),
        partial_rotary_factor=None,
    )
    rot = RotaryConfig.from_hf_config(obj)
    assert (rot.head_dim, rot.rotary_dim, rot.base, rot.scaling["rope_type"]) == (
        128,
        128,
        500000.0,
        "llama3",
    )
    partial = RotaryConfig.from_hf_config(
        {"head_dim": 80, "partial_rotary_factor": 0.4, "rope_scaling": {"rope_type": "default"}},
        is_neox_style=False,
    )
    assert (partial.rotary_dim, partial.base, partial.scaling, partial.is_neox_style) == (
        32,
        10000.0,
        None,
        False,
    )
    v5 = {
        "head_dim": 64,
        "rope_parameters": {"rope_type": "linear", "factor": 2.0, "rope_theta": 1e6},
    }
    rot5 = RotaryConfig.from_hf_config(v5)
    assert rot5.base == 1e6 and dict(rot5.scaling) == {"rope_type": "linear", "factor": 2.0}
    with pytest.raises(ValueError):
        RotaryConfig.from_hf_config({"rope_theta": 1e4})


def test_scaling_is_a_read_only_copy():
    source = dict(LINEAR)
    rot = RotaryConfig(64, 64, scaling=source)
    source["factor"] = 99.0
    assert rot.scaling["factor"] == 2.5
    with pytest.raises(TypeError):
        rot.scaling["factor"] = 1.0  # type: ignore[index]
    same = RotaryConfig(64, 64, scaling=dict(LINEAR))
    assert rot == same and hash(rot) == hash(same)
    assert rot != RotaryConfig(64, 64, scaling={"type": "linear", "factor": 3.0})


def test_realign_input_validation():
    rotary = RotaryConfig(head_dim=16, rotary_dim=16)
    keys, pos = torch.randn(4, 2, 16), torch.arange(4)
    with pytest.raises(ValueError, match="keys"):
        realign_keys(keys.flatten(1), pos, pos, rotary)
    with pytest.raises(ValueError, match="keys"):
        realign_keys(keys.to(torch.int32), pos, pos, rotary)
    with pytest.raises(ValueError, match="head_dim"):
        realign_keys(torch.randn(4, 2, 8), pos, pos, rotary)
    with pytest.raises(ValueError, match="old_positions"):
        realign_keys(keys, pos.float(), pos, rotary)
    with pytest.raises(ValueError, match="new_positions"):
        realign_keys(keys, pos, pos[:3], rotary)


def test_cpu_tensors_never_take_the_flashinfer_path():
    assert not _use_flashinfer(torch.randn(2, 1, 8, dtype=torch.bfloat16))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("neox", [True, False])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_flashinfer_path_matches_torch_path(neox, dtype):
    pytest.importorskip("flashinfer")
    rotary = RotaryConfig(
        head_dim=128, rotary_dim=64, base=500000.0, is_neox_style=neox, scaling=LLAMA3
    )
    cached, old, new, want = _case(rotary, tokens=513, heads=8, dtype=dtype, seed=3)
    on_gpu = cached.cuda()
    assert _use_flashinfer(on_gpu)
    got = realign_keys(on_gpu, old.cuda(), new.cuda(), rotary).cpu()
    torch.testing.assert_close(
        got.float(), realign_keys(cached, old, new, rotary).float(), **TOL[dtype]
    )
    torch.testing.assert_close(got.float(), want.float(), **TOL[dtype])


def test_theta_is_read_from_transformers_v5_rope_parameters():
    """transformers v5 configs carry rope_theta only inside rope_parameters (SmolLM2: 1e5)."""
    import transformers

    from sglang_cacheblend.blend.rotary_config import RotaryConfig

    config = transformers.LlamaConfig(hidden_size=64, num_attention_heads=4, rope_theta=1e5)
    assert RotaryConfig.from_hf_config(config).base == 1e5
    assert RotaryConfig.from_hf_config(config).scaling is None
