"""A fake pool allocator that catches double frees and frees of slots it never handed out."""

from __future__ import annotations

import pytest
import torch


class FakeAllocator:
    """Slots ``1..size`` (0 is the padding slot, as in SGLang); ``free`` checks every slot."""

    def __init__(self, size: int) -> None:
        self.size = size
        self.free_slots = set(range(1, size + 1))
        self.num_free_calls = 0

    def available_size(self) -> int:
        return len(self.free_slots)

    def alloc(self, need_size: int) -> torch.Tensor | None:
        if need_size > len(self.free_slots):
            return None
        slots = sorted(self.free_slots)[:need_size]
        self.free_slots.difference_update(slots)
        return torch.tensor(slots, dtype=torch.int64)

    def free(self, kv_loc: torch.Tensor) -> None:
        assert kv_loc.dtype == torch.int64 and kv_loc.dim() == 1
        self.num_free_calls += 1
        for slot in kv_loc.tolist():
            assert 1 <= slot <= self.size, f"slot {slot} was never allocated"
            assert slot not in self.free_slots, f"slot {slot} freed twice"
            self.free_slots.add(slot)


@pytest.fixture
def make_allocator():
    return FakeAllocator
