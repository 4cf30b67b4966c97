"""The engine's settings, as a server passes them in, and their per-device defaults. Torch-free:
the server's `--help` reads the defaults before torch is imported."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TypeVar

Value = TypeVar("Value", int, float)

KV_CACHE_MB = {"cpu": 1024, "cuda": 8192}
# prompt tokens per step. On a GPU a step of 512 tokens mostly pays for its launches. On a CPU a
# running row waits for the step's prompt chunk, yet chunks of 128 measured no better than 512 in
# the load bench: first tokens 0.94x as late, requests 0.96x as fast (geometric means of four
# runs; docs/load-bench.md)
MAX_PREFILL_TOKENS = {"cpu": 512, "cuda": 8192}
# decode steps of up to this many rows replay a captured CUDA graph (model.forward.cuda_graphs)
DECODE_GRAPH_ROWS = {"cpu": 0, "cuda": 128}
POOL_CONTEXTS = 16  # a default pool never holds more than this many full contexts
# what a token adds to a decode step, as a share of the step's time apart from its tokens: the
# speculation cost model's slope until the steps it sees show theirs (model.engine.speculation).
# A CPU: 0.35 (bench.step, the embedded model in int4 on AVX2, the layer stack in one call:
# 5.5-6.1 ms at 1 row, 14.4-14.7 at 7, about 1.5 ms a token over a fixed 4.2 ms). A GPU: 0.005
# (an 8B model on an H100, as SGLang publishes it: 7.4 ms a step at 1 row, 11.8 ms at 128; a
# step is bound by reading the weights up to hundreds of rows)
TOKEN_SHARE = {"cpu": 0.35, "cuda": 0.005}
MAX_PROPOSAL_TOKENS = 8  # the longest proposal a row verifies in a step


def per_device(defaults: dict[str, Value], device_type: str) -> Value:
    """The device type's default; a CPU's for other devices."""
    return defaults.get(device_type, defaults["cpu"])


def describe_per_device(defaults: dict[str, Value]) -> str:
    """'1024 on cpu, 8192 on cuda'."""
    return ", ".join(f"{value} on {device}" for device, value in defaults.items())


@dataclass(frozen=True)
class EngineOptions:
    """None: the device's default."""

    kv_cache_mb: float | None = None
    max_prefill_tokens: int | None = None
    decode_graph_rows: int | None = None  # on CUDA; a CPU never replays decode graphs
    speculate: bool = True  # rows verify proposed tokens where the cost model says it pays
    max_proposal_tokens: int = MAX_PROPOSAL_TOKENS
