"""The explicit softmax shared by the question rules and the lookahead, against a float64 loop.

What must hold: each block is ``(num_kv_heads, group, b, num_keys)`` with query head
``kv_head * group + g``; a key after the query's position gets exactly 0; extra keys join only
the denominator (each row sums to 1 minus their share); blocks cover the queries in order.
"""

from __future__ import annotations

import math

import pytest
import torch

from sglang_cacheblend.blend.explicit_attention import BLOCK_QUERY_ROWS, explicit_attention_blocks


def _reference(q, keys, q_pos, key_pos, extra):
    """``(num_q_heads, num_q, num_keys)`` float64 probabilities, one query head at a time."""
    num_q, q_heads, dim = q.shape
    group = q_heads // keys.shape[1]
    out = torch.zeros(q_heads, num_q, keys.shape[0], dtype=torch.float64)
    for s in range(num_q):
        for h in range(q_heads):
            qh = q[s, h].double()
            seen = [j for j in range(keys.shape[0]) if key_pos[j] <= q_pos[s]]
            logits = {j: float(qh @ keys[j, h // group].double()) / math.sqrt(dim) for j in seen}
            extra_logits = [float(qh @ e[h // group].double()) / math.sqrt(dim) for e in extra]
            z = sum(math.exp(x) for x in logits.values()) + sum(math.exp(x) for x in extra_logits)
            for j, x in logits.items():
                out[h, s, j] = math.exp(x) / z
    return out


@pytest.mark.parametrize("num_extra", [0, 5])
def test_blocks_equal_a_float64_loop(num_extra):
    gen = torch.Generator().manual_seed(1)
    num_q, num_keys = BLOCK_QUERY_ROWS + 6, 90  # two blocks, the second short
    q = torch.randn(num_q, 6, 8, generator=gen)
    keys = torch.randn(num_keys, 2, 8, generator=gen)
    key_pos = torch.randperm(num_keys, generator=gen) + 10  # any order, not 0-based
    q_pos = torch.sort(torch.randint(10, 10 + num_keys, (num_q,), generator=gen)).values
    extra = torch.randn(num_extra, 2, 8, generator=gen)
    blocks = list(explicit_attention_blocks(q, keys, q_pos, key_pos, extra))
    assert [b.shape for b in blocks] == [(2, 3, BLOCK_QUERY_ROWS, num_keys), (2, 3, 6, num_keys)]
    assert all(b.dtype == torch.float32 for b in blocks)
    got = torch.cat(blocks, dim=2).reshape(6, num_q, num_keys)  # (kv_head, g) -> query head
    want = _reference(q, keys, q_pos, key_pos, extra)
    torch.testing.assert_close(got.double(), want, atol=1e-6, rtol=1e-5)
    hidden = key_pos[None, :] > q_pos[:, None]
    assert torch.all(got[:, hidden] == 0)
    row_sums = got.double().sum(-1)
    if num_extra == 0:
        torch.testing.assert_close(row_sums, torch.ones_like(row_sums))
    else:
        assert torch.all(row_sums < 1)


def test_empty_extra_keys_are_no_extra_keys():
    gen = torch.Generator().manual_seed(2)
    q, keys = torch.randn(4, 4, 8, generator=gen), torch.randn(7, 2, 8, generator=gen)
    q_pos, key_pos = torch.tensor([3, 4, 5, 6]), torch.arange(7)
    none = list(explicit_attention_blocks(q, keys, q_pos, key_pos))
    empty = list(explicit_attention_blocks(q, keys, q_pos, key_pos, torch.zeros(0, 2, 8)))
    assert len(none) == len(empty) == 1 and torch.equal(none[0], empty[0])


@pytest.mark.parametrize(
    "q_shape, keys_shape, extra_shape, message",
    [
        ((4, 4, 8), (7, 2, 6), None, "same head_dim"),
        ((4, 3, 8), (7, 2, 8), None, "multiple"),
        ((4, 4, 8), (7, 2, 8), (3, 1, 8), "extra_keys"),
    ],
)
def test_bad_shapes_are_refused(q_shape, keys_shape, extra_shape, message):
    extra = None if extra_shape is None else torch.zeros(extra_shape)
    with pytest.raises(ValueError, match=message):  # on the call, before any block
        explicit_attention_blocks(torch.zeros(q_shape), torch.zeros(keys_shape), torch.arange(4),
                                  torch.arange(7), extra)
    with pytest.raises(ValueError, match="q_positions"):
        explicit_attention_blocks(torch.zeros(4, 4, 8), torch.zeros(7, 2, 8), torch.arange(3),
                                  torch.arange(7))
