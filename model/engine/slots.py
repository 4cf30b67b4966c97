"""Which pool slots are free: contiguous runs handed out first fit, neighbours merged on free.
Torch-free, so the scheduler and the prefix cache that use it are too."""

from __future__ import annotations

import bisect


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
