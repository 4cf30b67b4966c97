"""The engine's public interface: everything the server takes from the engine, and the one way
it opens one (`open_engine`).

What crosses it are plain messages: the server hands in groups of `Member`s (each with its
`SamplingParams`), checked once against the frozen `EngineLimits`; the engine's thread hands back
`TokenEvent`s (the last one of a member with its `Usage`) and, after each step, its
`EngineCounters`. The server reads nothing else of the engine. Its settings come in as frozen
`EngineOptions`, with the names and per-device defaults the server's flags show (the weight
formats among them); where the engine builds its C kernels (and the loader keeps converted
models) is set once, with `use_cache_dir`, and the instruction set they may use with
`use_isa_cap`. Torch-free: the server's settings and messages load
before torch does; `open_engine` imports the model code.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

from model.cache import use_cache_dir
from model.engine.limits import EngineLimits
from model.engine.options import (
    DECODE_GRAPH_ROWS,
    KV_CACHE_MB,
    MAX_PREFILL_TOKENS,
    MAX_PROPOSAL_TOKENS,
    POOL_CONTEXTS,
    EngineOptions,
    describe_per_device,
)
from model.engine.request import (
    SEED_RANGE,
    EngineCounters,
    EngineInputError,
    Member,
    SamplingParams,
    TokenEvent,
    Usage,
)
from model.native import ISA_CHOICES, IsaError, check_isa_cap, use_isa_cap
from model.weights.choices import AUTO_WEIGHTS, WEIGHT_CHOICES

if TYPE_CHECKING:
    from model.weights.loading import LoadedModel

__all__ = [
    "AUTO_WEIGHTS", "DECODE_GRAPH_ROWS", "ISA_CHOICES", "KV_CACHE_MB", "MAX_PREFILL_TOKENS",
    "MAX_PROPOSAL_TOKENS", "POOL_CONTEXTS", "SEED_RANGE", "WEIGHT_CHOICES", "Engine",
    "EngineCounters", "EngineInputError", "EngineLimits", "EngineOptions", "IsaError", "Member",
    "SamplingParams", "TokenEvent", "Usage", "check_isa_cap", "describe_per_device",
    "open_engine", "use_cache_dir", "use_isa_cap",
]

log = logging.getLogger("groupwise.model")


class Engine(Protocol):
    """The step loop (`GroupedEngine`), as its one thread drives it."""

    @property
    def limits(self) -> EngineLimits: ...

    @property
    def has_work(self) -> bool: ...

    def add(self, members: Sequence[Member], uses_trained_head: bool = True) -> None:
        """Queues one group that `limits.check_group` accepted."""

    def step(self) -> list[TokenEvent]: ...

    def counters(self) -> EngineCounters: ...

    def reset(self) -> list[Member]:
        """Forgets everything; returns the members it held, for the caller to fail."""

    def abort_all(self) -> Iterable[TokenEvent]: ...


def open_engine(loaded: LoadedModel, csa_checkpoint: Path | None,
                options: EngineOptions) -> Engine:
    """The engine for a loaded model, with the group head of `csa_checkpoint` (None: none).
    Raises CheckpointMismatchError for a checkpoint trained on another base model and
    FileNotFoundError for a path that holds none. Decode graphs are a GPU's: a CPU decodes
    eagerly whatever `options.decode_graph_rows` says."""
    from model.engine.grouped_engine import GroupedEngine
    from model.head.group_head import GroupHead
    from model.weights.loading import weights_signature

    head = None
    if csa_checkpoint is not None:
        head = GroupHead.load(csa_checkpoint, base_model=loaded.name,
                              base_signature=weights_signature(loaded.model),
                              hidden_size=loaded.model.config.hidden_size)
    graph_rows = options.decode_graph_rows if loaded.device.type == "cuda" else 0
    engine = GroupedEngine(loaded.model, loaded.tokenizer, head,
                           kv_cache_mb=options.kv_cache_mb,
                           max_prefill_tokens=options.max_prefill_tokens,
                           decode_graph_rows=graph_rows, speculate=options.speculate,
                           max_proposal_tokens=options.max_proposal_tokens)
    log.info("KV cache: %d tokens (%.0f MiB); speculation %s", engine.limits.kv_capacity,
             engine.pool.kv.nbytes / 2**20,
             f"auto, up to {options.max_proposal_tokens} tokens" if options.speculate else "off")
    return engine
