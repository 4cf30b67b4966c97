"""The KV pool: every key and value the engine keeps, in one tensor allocated once.

Layout: kv[layer, 0 = key | 1 = value, kv_head, slot, head_dim]. A slot holds one token's key and
value in every layer. Sequences own *contiguous* runs of slots (extents), so attention reads an
extent as a plain strided view of the pool (`keys(layer)[:, start:end]`): no gather, no copy.
Extents come from `SlotAllocator`, a first-fit allocator that merges neighbouring free runs.
"""

from __future__ import annotations

import bisect

import torch

from model.forward.decoder import PoolShape


class SlotAllocator:
    """Contiguous runs of slots in [0, capacity): first fit, neighbours merged on free."""

    def __init__(self, capacity: int):
        self.capacity = capacity
        self._starts = [0]  # free runs, sorted by start
        self._lengths = [capacity]
        self.num_free = capacity

    def allocate(self, length: int) -> int | None:
        """The first slot of a new run of `length` slots, or None when no free run is long
        enough (there may still be that many free slots in shorter runs)."""
        if length <= 0:
            return 0
        for index, free in enumerate(self._lengths):
            if free >= length:
                start = self._starts[index]
                if free == length:
                    del self._starts[index], self._lengths[index]
                else:
                    self._starts[index] += length
                    self._lengths[index] -= length
                self.num_free -= length
                return start
        return None

    def free(self, start: int, length: int) -> None:
        if length <= 0:
            return
        assert start >= 0 and start + length <= self.capacity, (start, length)
        index = bisect.bisect_left(self._starts, start)
        assert index == len(self._starts) or start + length <= self._starts[index], "double free"
        assert index == 0 or self._starts[index - 1] + self._lengths[index - 1] <= start
        self._starts.insert(index, start)
        self._lengths.insert(index, length)
        self.num_free += length
        if index + 1 < len(self._starts) and start + length == self._starts[index + 1]:
            self._lengths[index] += self._lengths.pop(index + 1)
            del self._starts[index + 1]
        if index > 0 and self._starts[index - 1] + self._lengths[index - 1] == start:
            self._lengths[index - 1] += self._lengths.pop(index)
            del self._starts[index]


class KVPool:
    def __init__(self, shape: PoolShape, capacity: int, dtype: torch.dtype,
                 device: torch.device | str = "cpu"):
        if capacity < 1:
            raise ValueError(f"the KV pool needs at least one slot, got {capacity}")
        self.shape = shape
        self.capacity = capacity
        # one slot more than the allocator hands out: the scratch slot, where the padding rows
        # of a captured decode step write (model.forward.cuda_graphs). zeros, not empty: the
        # memory is touched now, so the process does not grow under load
        self.kv = torch.zeros(shape.num_layers, 2, shape.num_kv_heads, capacity + 1,
                              shape.head_dim, dtype=dtype, device=device)
        self.slots = SlotAllocator(capacity)

    @property
    def scratch_slot(self) -> int:
        return self.capacity

    @classmethod
    def with_megabytes(cls, shape: PoolShape, megabytes: float, dtype: torch.dtype,
                       device: torch.device | str = "cpu") -> KVPool:
        capacity = int(megabytes * 2**20) // shape.bytes_per_token(dtype)
        return cls(shape, capacity, dtype, device)

    def keys(self, layer: int) -> torch.Tensor:
        return self.kv[layer, 0]  # [kv_heads, capacity, head_dim]

    def values(self, layer: int) -> torch.Tensor:
        return self.kv[layer, 1]
