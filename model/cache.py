"""Where the project keeps what it builds once and reuses: dequantized models, the CPU kernels,
training features. A setting of the process: the edge (the server's --cache, the CLIs' --cache,
GROUPWISE_CACHE) sets it once with `use_cache_dir`; model code only asks `cache_dir()`."""

from __future__ import annotations

from pathlib import Path

DEFAULT_CACHE_DIR = Path.home() / ".cache" / "groupwise"
_directory = DEFAULT_CACHE_DIR


def cache_dir() -> Path:
    return _directory


def use_cache_dir(directory: str | Path | None) -> None:
    """From now on, for the whole process; None or "": the default, ~/.cache/groupwise."""
    global _directory
    _directory = Path(directory).expanduser() if directory else DEFAULT_CACHE_DIR
