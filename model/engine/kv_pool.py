"""The KV pool: every key and value the engine keeps, in one tensor allocated once.

Layout: kv[layer, 0 = key | 1 = value, kv_head, slot, head_dim]. A slot holds one token's key and
value in every layer. Sequences own *contiguous* runs of slots (extents), so attention reads an
extent as a plain strided view of the pool (`kv[layer, 0, :, start:end]`): no gather, no copy.
Which slots are free is the scheduler's to know (`model.engine.slots`).
"""

from __future__ import annotations

import torch

from model.forward.decoder import PoolShape


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

    @property
    def scratch_slot(self) -> int:
        return self.capacity

    @classmethod
    def with_megabytes(cls, shape: PoolShape, megabytes: float, dtype: torch.dtype,
                       device: torch.device | str = "cpu") -> KVPool:
        capacity = int(megabytes * 2**20) // shape.bytes_per_token(dtype)
        return cls(shape, capacity, dtype, device)
