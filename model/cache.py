"""Where the server keeps what it builds once and reuses: dequantized models, the CPU kernels,
training features. GROUPWISE_CACHE moves it."""

from __future__ import annotations

import os
from pathlib import Path


def cache_dir() -> Path:
    return Path(os.environ.get("GROUPWISE_CACHE", Path.home() / ".cache" / "groupwise"))
