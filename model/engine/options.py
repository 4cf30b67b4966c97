"""The engine's settings, as a server passes them in, and their per-device defaults. Torch-free:
the server's `--help` reads the defaults before torch is imported."""

from __future__ import annotations

from dataclasses import dataclass

KV_CACHE_MB = {"cpu": 1024, "cuda": 8192}
# prompt tokens per step: on a GPU a step of 512 tokens mostly pays for its launches
MAX_PREFILL_TOKENS = {"cpu": 512, "cuda": 8192}
# decode steps of up to this many rows replay a captured CUDA graph (model.forward.cuda_graphs)
DECODE_GRAPH_ROWS = {"cpu": 0, "cuda": 128}
POOL_CONTEXTS = 16  # a default pool never holds more than this many full contexts


def per_device(defaults: dict[str, int], device_type: str) -> int:
    """The device type's default; a CPU's for other devices."""
    return defaults.get(device_type, defaults["cpu"])


def describe_per_device(defaults: dict[str, int]) -> str:
    """'1024 on cpu, 8192 on cuda'."""
    return ", ".join(f"{value} on {device}" for device, value in defaults.items())


@dataclass(frozen=True)
class EngineOptions:
    """None: the device's default."""

    kv_cache_mb: float | None = None
    max_prefill_tokens: int | None = None
    decode_graph_rows: int | None = None  # on CUDA; a CPU never replays decode graphs
