"""A progress bar on stderr, with no dependency."""

from __future__ import annotations

import sys
import time


class Progress:
    """A progress bar on stderr: redrawn in place on a terminal, one line at the end otherwise."""

    WIDTH = 30

    def __init__(self, label: str, total: int, stream=None):
        self.label, self.total, self.done = label, total, 0
        self.stream = stream or sys.stderr
        self.is_live = self.stream.isatty()
        self.started = time.perf_counter()
        self._draw()

    def advance(self, count: int) -> None:
        self.done += count
        self._draw()

    def close(self) -> None:
        self.stream.write(("\r" if self.is_live else "") + self.line() + "\n")
        self.stream.flush()

    def line(self) -> str:
        filled = self.WIDTH * self.done // max(self.total, 1)
        bar = "#" * filled + "." * (self.WIDTH - filled)
        elapsed = time.perf_counter() - self.started
        return f"{self.label} [{bar}] {self.done}/{self.total} questions {elapsed:.1f} s"

    def _draw(self) -> None:
        if self.is_live:
            self.stream.write("\r" + self.line())
            self.stream.flush()
